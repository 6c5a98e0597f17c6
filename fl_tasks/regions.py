"""The regional tier: which silos form a region and which store each step of a region uses.

Pure (pydantic spec models only): the DAG builder calls it at parse time to put each step's store
URL in its env, and least-privilege policies (per silo, per region) are derived from the same
answer, :func:`step_stores`, so the fact "which store does this step touch" lives here once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fl_tasks.contract import REGION_STEPS, SILO_STEPS
from fl_tasks.paths import expand_path
from fl_tasks.spec import AcrossRegions, JobSpec, Region, SecretRef, Silo

if TYPE_CHECKING:
    from fl_tasks.store import Store

#: Env var of the store a step reads and writes (the job's store unless the step runs in a region).
STORE_URL_ENV = "AIRFED_STORE_URL"
#: Env var of a regional-tier step's region store (its job-store side is ``AIRFED_STORE_URL``).
REGION_STORE_URL_ENV = "AIRFED_REGION_STORE_URL"
#: A regional-tier step's S3 settings for its region's store: the plain names with this prefix (on
#: Kubernetes, the region's ``store_secrets`` reach these steps' pods under it), so the region's
#: store can be another endpoint with other keys than the job's.
REGION_ENV_PREFIX = "AIRFED_REGION_"
#: S3 credentials: never taken from the job's side for the region's store once the region has its own.
S3_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                      "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                      "AWS_CONTAINER_CREDENTIALS_FULL_URI")
#: Where the store is: the region's if given, else the job's.
S3_LOCATION_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "SSL_CERT_FILE")


@dataclass(frozen=True)
class StepStores:
    """The stores one step reads or writes. ``region_store``: the URL of its region's own store when
    the step touches it (None: it touches no region store, or its region has none and keeps its
    objects in the job's store); ``job_store``: whether the step touches the job's store."""

    region_store: str | None
    job_store: bool


def region_named(spec: JobSpec, name: str) -> Region:
    for region in spec.regions:
        if region.name == name:
            return region
    raise ValueError(f"job {spec.job} has no region {name!r}; regions: {', '.join(r.name for r in spec.regions)}")


def region_of(spec: JobSpec, silo: str) -> Region | None:
    """The region a silo belongs to (None in a job without regions)."""
    for s in spec.silos:
        if s.name == silo:
            return region_named(spec, s.region) if s.region else None
    raise ValueError(f"job {spec.job} has no silo {silo!r}")


def silos_of(spec: JobSpec, region: str) -> list[Silo]:
    return [s for s in spec.silos if s.region == region]


def step_stores(spec: JobSpec, step: str, *, silo: str | None = None, region: str | None = None) -> StepStores:
    """Which store step ``step`` of silo ``silo`` (silo steps) or region ``region`` (regional-tier
    steps) uses. Silo steps of a region use only the region's store; regional-tier steps use the
    region's store and the job's (they alone move plan, models and partials between the two); every
    other step (and every step of a job without regions) uses only the job's store."""
    if step in SILO_STEPS:
        if silo is None:
            raise ValueError(f"step {step} is per silo: name the silo")
        home = region_of(spec, silo)
        own = home.store if home else None
        return StepStores(region_store=own, job_store=own is None)
    if step in REGION_STEPS:
        if region is None:
            raise ValueError(f"step {step} is per region: name the region")
        return StepStores(region_store=region_named(spec, region).store, job_store=True)
    return StepStores(region_store=None, job_store=True)


def store_env(spec: JobSpec, step: str, *, silo: str | None = None, region: str | None = None) -> dict[str, str]:
    """The store env of a step's StepCall (empty: the worker's ``AIRFED_STORE_URL``, the job's store).

    ``${AIRFED_HOME}`` and ``~`` in a region's ``file://`` URL are expanded here (the local runner's
    worker is the machine that runs the step)."""
    url = step_stores(spec, step, silo=silo, region=region).region_store
    if url is None:
        return {}
    if url.startswith("file://"):
        url = expand_path(url)
    return {REGION_STORE_URL_ENV if step in REGION_STEPS else STORE_URL_ENV: url}


def region_env_prefix(region: str) -> str:
    """``AIRFED_REGION_<NAME>_``: settings for one named region's store (``eu-west`` → ``EU_WEST``)."""
    return f"{REGION_ENV_PREFIX}{re.sub(r'[^A-Z0-9]', '_', region.upper())}_"


def region_store_environ(environ: Mapping[str, str], region: str | None = None) -> dict[str, str]:
    """The environment a regional-tier step (or ``airfed verify``) opens ``region``'s store with.

    The region's S3 settings are the first of: ``AIRFED_REGION_<NAME>_AWS_*`` (one worker or one
    auditor holding keys for several regions), ``AIRFED_REGION_AWS_*`` (what a regional pod gets from
    its region's ``store_secrets``), else ``environ`` itself (one endpoint and one key for both stores,
    as a region that is a bucket or prefix beside the job's). With region settings, each replaces its
    plain one and credentials come from them only, so the job store's key is never sent to the
    region's endpoint; an endpoint of its own without a key of its own is refused."""
    prefixes = [region_env_prefix(region)] if region else []
    for prefix in [*prefixes, REGION_ENV_PREFIX]:
        own = {var: environ[prefix + var] for var in (*S3_CREDENTIAL_VARS, *S3_LOCATION_VARS)
               if environ.get(prefix + var)}
        if not own:
            continue
        if not any(var in own for var in S3_CREDENTIAL_VARS):
            raise ValueError(f"{', '.join(prefix + v for v in own)} set but no {prefix}AWS_ACCESS_KEY_ID (or "
                             f"another {prefix}AWS_* credential): the region's store needs its own key; the job "
                             f"store's is not sent to it")
        return {**{k: v for k, v in environ.items() if k not in S3_CREDENTIAL_VARS}, **own}
    return dict(environ)


def store_secrets(spec: JobSpec, *, silo: str | None = None, region: str | None = None) -> list[SecretRef]:
    """The region's store credentials a silo's (or the region's own) pods receive: only their region's."""
    home = region_of(spec, silo) if silo is not None else (region_named(spec, region) if region else None)
    return list(home.store_secrets) if home else []


def plan_fields(spec: JobSpec) -> dict[str, object]:
    """What plan.json records of the regional tier (nothing for a flat job: its plan is as before)."""
    if not spec.regions:
        return {}
    from fl_tasks.records import PlanRegion  # records import the spec; keep this module's imports light

    return {
        "regions": [
            PlanRegion(name=r.name, silos=[s.name for s in silos_of(spec, r.name)], quorum=r.quorum)
            for r in spec.regions
        ],
        "across_regions": spec.across_regions or AcrossRegions(),
    }


def region_stores(spec: JobSpec, job_store: Store) -> dict[str, Store]:
    """Each region's store, opened (a region without its own store keeps its objects in ``job_store``):
    what ``airfed verify`` recomputes the regional level from."""
    from fl_tasks.store import open_store

    stores: dict[str, Store] = {}
    for region in spec.regions:
        url = store_env(spec, "aggregate_region", region=region.name).get(REGION_STORE_URL_ENV)
        stores[region.name] = open_store(url, region_store_environ(os.environ, region.name)) if url else job_store
    return stores
