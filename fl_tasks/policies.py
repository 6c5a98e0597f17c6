"""Least-privilege S3 access policies of a job, generated from its spec (``airfed policies``).

Four kinds of identity touch a job's objects in the store (:class:`~fl_tasks.store.JobKeys`):

- **a silo** (its train, validate and evaluate steps) reads the round's ``plan.json``, its
  ``global.safetensors``, ``result.json`` (evaluate learns the new global from it) and ``HEAD.json``
  (which holds the result's sha256), and reads and writes only its own objects:
  ``updates/<silo>.safetensors``, ``updates/<silo>.json``, ``updates/<silo>.status.json``,
  ``validation/<silo>.json``, ``evaluation/<silo>.json``;
- **the server** (distribute, aggregate, register) reads and writes everything of the job;
- **the Airflow UI** reads everything of the job and writes nothing;
- **a regional aggregator** (a job with ``regions``: its distribute_region, aggregate_region,
  publish_region and collect_region steps, :mod:`fl_tasks.steps.regional`) reads the round's plan,
  globals and result in the job's store and copies them into its region's store; reads its own silos'
  objects there; and writes to the job's store only its partial (``rounds/<r>/regions/<region>.*``)
  and the copied-up JSON records (manifest, verdict, status, evaluation) of its own silos, never an
  update. A silo of a region with its own store gets its policy on that store alone, and the server's
  and the UI's cover the job's store and not the regions' (silo updates stay in their region).

Round numbers are not known in advance, so keys are given as patterns with the round replaced by
``*``. In S3 policies ``*`` also matches ``/``, so a pattern pins everything around the round: the
job's prefix before it and ``/updates/<silo>.<ext>`` after it. Silo names are DNS labels (no ``.``,
``/``, ``*`` or ``?``), so ``/updates/a.json`` can never end another silo's key (``/updates/ab.json``,
``/updates/x-a.json``); :func:`check_isolation` proves it for every silo's policy against every
other silo's keys and the server's, using :func:`allows` (the S3 wildcard rule) instead of trusting the patterns.

Formats differ in one place. AWS S3 answers a read of a missing key with 403 instead of 404
unless the caller may ``s3:ListBucket`` the bucket, and the steps read keys that may not exist yet
(a silo's own manifest before it trains): the ``aws`` format therefore grants silos and the UI
``s3:ListBucket`` limited by an ``s3:prefix`` condition to the job. MinIO answers 404 to an
authenticated caller that may read the key, so the ``minio`` format leaves listing out. The server
lists the bucket without a condition in both (``HeadBucket`` before the first round is authorised
as ``s3:ListBucket``). Conditional writes (``If-None-Match`` / ``If-Match``, :mod:`fl_tasks.commit`)
need no more than ``s3:PutObject``.

Which store a silo's or the server's steps use comes from :func:`store_url` and, with regions,
:func:`fl_tasks.regions.step_stores` (the answer the DAG builder puts in each step's env), so that a
job whose silos write to different stores gets policies naming each one's own store.
Pure (stdlib and the spec model): the Airflow side imports it for the CLI.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from fl_tasks.regions import silos_of, step_stores, store_secrets
from fl_tasks.spec import JobSpec, Placement, Region, SecretRef
from fl_tasks.store.base import JobKeys

Format = Literal["aws", "minio"]
FORMATS: tuple[Format, ...] = ("aws", "minio")
POLICY_VERSION = "2012-10-17"
STORE_URL_ENV = "AIRFED_STORE_URL"
#: The store policies name when neither the spec nor the caller gives an ``s3://`` one (the Helm
#: chart's default ``store.url``).
DEFAULT_STORE_URL = "s3://airfed/fl"

READ = ["s3:GetObject"]
#: Writes of an object the identity owns: multipart uploads (large updates) are ``s3:PutObject``
#: plus their abort; ``s3:DeleteObject`` lets ``put_file`` remove an upload whose file changed
#: while it streamed.
WRITE = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"]
LIST = ["s3:ListBucket"]
#: A round number stands for any round in a key pattern.
ANY_ROUND = "*"
_SAMPLE_ROUND = 424242  # substituted by ANY_ROUND: a number no real key of a test holds
_UNSAFE = re.compile(r"[*?$\s]")


class PolicyError(ValueError):
    """The spec or store URL cannot be turned into a policy (names the value)."""


@dataclass(frozen=True)
class StoreLocation:
    """An ``s3://bucket/prefix`` store: where a job's keys live and their ARNs."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str, where: str) -> StoreLocation:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise PolicyError(
                f"{where}: {STORE_URL_ENV}={url!r} is not an s3://bucket/prefix store; access policies "
                "exist only for S3/MinIO (a file:// store is guarded by the file system)"
            )
        prefix = parsed.path.strip("/")
        if _UNSAFE.search(parsed.netloc + prefix) or "@" in parsed.netloc:
            raise PolicyError(f"{where}: store URL {url!r} holds characters that S3 policies read as "
                              "wildcards or variables ('*', '?', '$') or whitespace or credentials")
        return cls(parsed.netloc, prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def bucket_arn(self) -> str:
        return f"arn:aws:s3:::{self.bucket}"

    def name(self, key: str) -> str:
        """The object name of a store key (the key under the store's prefix)."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def arn(self, key: str) -> str:
        return f"{self.bucket_arn}/{self.name(key)}"


def store_url(spec: JobSpec, silo: str | None, default: str) -> str:
    """The store URL the steps of ``silo`` (None: the server steps) use: the silo's ``env``, else
    the job's ``env``, else ``default``. The one place policies learn where each identity writes."""
    env = dict(spec.env)
    if silo is not None:
        env.update(next(s.env for s in spec.silos if s.name == silo))
    return env.get(STORE_URL_ENV) or default


def region_store_url(spec: JobSpec, region: Region, overrides: Mapping[str, str]) -> str | None:
    """The store URL of ``region``'s own store (None: it keeps its objects in the job's store);
    ``overrides`` (region -> URL) stands in for a store the spec names as ``file://`` on a dev machine."""
    url = step_stores(spec, "aggregate_region", region=region.name).region_store
    if url is None and region.name in overrides:
        raise PolicyError(f"region {region.name} has no `store` of its own (its objects stay in the job's "
                          "store): a --region-store for it would name a store its steps never use")
    return overrides.get(region.name, url) if url is not None else None


def silo_store_url(spec: JobSpec, silo: str, default: str, overrides: Mapping[str, str]) -> str:
    """The store a silo's steps use: its region's own store, else the one :func:`store_url` names."""
    region = step_stores(spec, "train", silo=silo).region_store
    if region is not None:
        home = next(s.region for s in spec.silos if s.name == silo)
        return overrides.get(home or "", region)
    return store_url(spec, silo, default)


def any_round(keys: JobKeys, key_of: Callable[[int], str]) -> str:
    """The key ``key_of(round)`` names, for any round (the round replaced by ``*``)."""
    sample, round_dir = key_of(_SAMPLE_ROUND), keys.round_dir(_SAMPLE_ROUND)
    if not sample.startswith(round_dir + "/"):
        raise AssertionError(f"{sample} is not under {round_dir}")
    return round_dir.rsplit("/", 1)[0] + "/" + ANY_ROUND + sample[len(round_dir):]


def round_reads(keys: JobKeys) -> list[str]:
    """What every silo reads: a round's plan, the global it trains from, the committed result
    (evaluate finds the new global there), and HEAD (which records the result's sha256)."""
    return [any_round(keys, keys.plan), any_round(keys, keys.global_model), any_round(keys, keys.result), keys.head]


def per_silo_keys(keys: JobKeys) -> tuple[Callable[[int, str], str], ...]:
    """The key names of a silo's own objects (round, silo) -> key: update, manifest, train status,
    verdict, evaluation."""
    return keys.update, keys.manifest, keys.status, keys.verdict, keys.evaluation


def silo_objects(keys: JobKeys, silo: str) -> list[str]:
    """The keys a silo's steps write (and read back), in any round."""
    def of(key_of: Callable[[int, str], str]) -> str:
        return any_round(keys, lambda r: key_of(r, silo))

    return [of(key_of) for key_of in per_silo_keys(keys)]


def partial_keys(keys: JobKeys, region: str) -> list[str]:
    """A region's partial aggregate and its record in the job's store, in any round."""
    return [any_round(keys, lambda r: keys.partial(r, region)),
            any_round(keys, lambda r: keys.partial_record(r, region))]


def copied_up(keys: JobKeys, silo: str) -> list[str]:
    """A silo's JSON records a regional aggregator copies into the job's store (never its update)."""
    def of(key_of: Callable[[int, str], str]) -> str:
        return any_round(keys, lambda r: key_of(r, silo))

    return [of(key_of) for key_of in (keys.manifest, keys.status, keys.verdict, keys.evaluation)]


def job_objects(keys: JobKeys) -> str:
    """Every key of the job."""
    return f"{keys.job}/*"


def _statement(sid: str, actions: list[str], resources: list[str],
               condition: dict[str, Any] | None = None) -> dict[str, Any]:
    statement: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}
    if condition:
        statement["Condition"] = condition
    return statement


def _listing(store: StoreLocation, keys: JobKeys, n: int = 0) -> dict[str, Any]:
    """``s3:ListBucket`` limited to the job's keys: on AWS, what makes a missing key read as missing.
    ``n``: the statement's number among several (one per store; IAM wants each Sid unique)."""
    return _statement("ListJobKeysSoMissingKeysReadAs404" + (f"InStore{n + 1}" if n else ""), LIST, [store.bucket_arn],
                      {"StringLike": {"s3:prefix": [store.name(job_objects(keys))]}})


def _document(statements: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Version": POLICY_VERSION, "Statement": statements}


def silo_policy(store: StoreLocation, keys: JobKeys, silo: str, fmt: Format) -> dict[str, Any]:
    statements = [
        _statement("ReadTheRound", READ, [store.arn(k) for k in round_reads(keys)]),
        _statement("ReadWriteOwnObjects", READ + WRITE, [store.arn(k) for k in silo_objects(keys, silo)]),
    ]
    if fmt == "aws":
        statements.append(_listing(store, keys))
    return _document(statements)


def region_policy(job_store: StoreLocation, region_store: StoreLocation | None, keys: JobKeys, region: str,
                  silos: list[str], fmt: Format) -> dict[str, Any]:
    """A regional aggregator's policy. ``region_store`` None: the region keeps its objects in the job's
    store, so nothing is copied and the aggregator reads its silos' objects there."""
    # HEAD: publish_region reads the result against it and copies it down for the region's evaluate
    downs = [any_round(keys, keys.plan), any_round(keys, keys.global_model), any_round(keys, keys.result), keys.head]
    home = region_store or job_store
    own_silos = [k for silo in silos for k in silo_objects(keys, silo)]
    statements = [
        _statement("ReadTheRoundInTheJobStore", READ, [job_store.arn(k) for k in downs]),
        _statement("WriteOwnPartial", READ + WRITE, [job_store.arn(k) for k in partial_keys(keys, region)]),
        _statement("ReadOwnSilosObjects", READ, [home.arn(k) for k in own_silos]),
    ]
    if region_store is not None:
        statements += [
            _statement("CopyTheRoundIntoTheRegionStore", READ + WRITE, [region_store.arn(k) for k in downs]),
            _statement("CopyOwnSilosRecordsUp", READ + WRITE,
                       [job_store.arn(k) for silo in silos for k in copied_up(keys, silo)]),
        ]
    if fmt == "aws":
        statements += [_listing(s, keys, n) for n, s in enumerate(dict.fromkeys([job_store, home]))]
    return _document(statements)


def server_policy(stores: list[StoreLocation], keys: JobKeys) -> dict[str, Any]:
    return _document([
        _statement("ReadWriteTheJob", READ + WRITE, [s.arn(job_objects(keys)) for s in stores]),
        _statement("FindTheBucketAndList", LIST, sorted({s.bucket_arn for s in stores})),
    ])


def ui_policy(stores: list[StoreLocation], keys: JobKeys, fmt: Format) -> dict[str, Any]:
    statements = [_statement("ReadTheJob", READ, [s.arn(job_objects(keys)) for s in stores])]
    if fmt == "aws":
        statements += [_listing(s, keys, n) for n, s in enumerate(stores)]
    return _document(statements)


@dataclass(frozen=True)
class JobPolicies:
    """The policies of one job, by name: ``<job>-silo-<silo>``, ``<job>-region-<region>`` (jobs with
    regions), ``<job>-server``, ``<job>-ui``."""

    job: str
    fmt: Format
    policies: dict[str, dict[str, Any]]
    silo_names: dict[str, str]  # silo -> its policy's name
    stores: dict[str, str]  # policy name -> store URL(s) it covers
    region_names: dict[str, str] = field(default_factory=dict)  # region -> its aggregator policy's name

    @property
    def server(self) -> str:
        return f"{self.job}-server"

    @property
    def ui(self) -> str:
        return f"{self.job}-ui"


@dataclass(frozen=True)
class JobStores:
    """Where each identity's steps read and write: the job's store, each silo's, each region's own
    (None: the region keeps its objects in the job's store), and the silos of each region."""

    job: StoreLocation
    silos: dict[str, StoreLocation]
    regions: dict[str, StoreLocation | None] = field(default_factory=dict)
    region_silos: dict[str, list[str]] = field(default_factory=dict)

    @property
    def every(self) -> list[StoreLocation]:
        return list(dict.fromkeys([self.job, *self.silos.values(), *(s for s in self.regions.values() if s)]))

    @property
    def global_tier(self) -> list[StoreLocation]:
        """The stores the server steps use: the job's and those of silos outside regional stores."""
        regional = {s for s in self.regions.values() if s}
        return list(dict.fromkeys([self.job, *(s for s in self.silos.values() if s not in regional)]))


def locate(spec: JobSpec, default_store: str = DEFAULT_STORE_URL,
           region_stores: Mapping[str, str] | None = None) -> JobStores:
    """Each identity's store, parsed (a :class:`PolicyError` names a store a policy cannot name)."""
    overrides = dict(region_stores or {})
    unknown = sorted(set(overrides) - {r.name for r in spec.regions})
    if unknown:
        raise PolicyError(f"job {spec.job} has no region {', '.join(map(repr, unknown))} (a region store was "
                          f"given for it); regions: {', '.join(r.name for r in spec.regions) or 'none'}")
    regions: dict[str, StoreLocation | None] = {}
    for region in spec.regions:
        url = region_store_url(spec, region, overrides)
        if url is not None and not url.startswith("s3://"):
            raise PolicyError(f"region {region.name}: store {url!r} is not an s3://bucket/prefix store; access "
                              "policies exist only for S3/MinIO: give the region's deployed store "
                              f"(airfed policies --region-store {region.name}=s3://bucket/prefix)")
        regions[region.name] = StoreLocation.parse(url, f"region {region.name}") if url else None
    silos = {s.name: StoreLocation.parse(silo_store_url(spec, s.name, default_store, overrides), f"silo {s.name}")
             for s in spec.silos}
    job = StoreLocation.parse(store_url(spec, None, default_store), f"job {spec.job}")
    for name, own in regions.items():
        if own == job:
            raise PolicyError(f"region {name}: its store {own.url} is the job's store; leave the region's "
                              "`store` out to keep its objects there (nothing is copied then)")
    return JobStores(
        job=job,
        silos=silos,
        regions=regions,
        region_silos={r.name: [s.name for s in silos_of(spec, r.name)] for r in spec.regions},
    )


def generate(spec: JobSpec, fmt: Format = "aws", default_store: str = DEFAULT_STORE_URL,
             region_stores: Mapping[str, str] | None = None) -> JobPolicies:
    """Every policy of ``spec``'s job, checked with :func:`check_isolation` before it is returned.
    ``region_stores`` (region -> ``s3://`` URL) replaces the store a region's spec names."""
    if fmt not in FORMATS:
        raise PolicyError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    keys = JobKeys(spec.job)
    where = locate(spec, default_store, region_stores)
    policies: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    region_names: dict[str, str] = {}
    stores: dict[str, str] = {}
    for silo, store in where.silos.items():
        names[silo] = f"{spec.job}-silo-{silo}"
        policies[names[silo]] = silo_policy(store, keys, silo, fmt)
        stores[names[silo]] = store.url
    for region, own in where.regions.items():
        region_names[region] = name = f"{spec.job}-region-{region}"
        policies[name] = region_policy(where.job, own, keys, region, where.region_silos[region], fmt)
        stores[name] = ", ".join(s.url for s in dict.fromkeys([where.job, own or where.job]))
    result = JobPolicies(spec.job, fmt, policies, names, stores, region_names)
    policies[result.server] = server_policy(where.global_tier, keys)
    policies[result.ui] = ui_policy(where.global_tier, keys, fmt)
    stores[result.server] = stores[result.ui] = ", ".join(s.url for s in where.global_tier)
    check_isolation(result, where)
    return result


# -- evaluation: the S3 wildcard rule, used to prove the policies instead of trusting them -----------
@functools.lru_cache(maxsize=4096)  # the isolation check asks about the same patterns thousands of times
def _wildcard(pattern: str) -> re.Pattern[str]:
    """An S3 policy pattern as a regex: ``*`` any run of characters (``/`` included), ``?`` one."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + r"\Z",
                      re.DOTALL)


def allows(policy: dict[str, Any], action: str, resource: str) -> bool:
    """Whether ``policy`` allows ``action`` on ``resource`` (Allow statements, conditions ignored:
    the strictest reading for a write, which no statement with a condition grants here)."""
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        if any(_wildcard(a).match(action) for a in statement["Action"]) and any(
            _wildcard(r).match(resource) for r in statement["Resource"]
        ):
            return True
    return False


def _expect(result: JobPolicies, name: str, action: str, arn: str, allowed: bool) -> None:
    if allows(result.policies[name], action, arn) != allowed:
        raise PolicyError(f"policy {name}: {action} on {arn} would be {'refused' if allowed else 'allowed'}; "
                          "the generator is wrong")


def check_isolation(result: JobPolicies, where: JobStores) -> None:
    """Raise :class:`PolicyError` unless, on sample keys of two rounds in every store of the job: a
    silo's policy reads and writes its own keys in its own store only and writes nothing of the
    server's or a region's; a regional aggregator's writes only its own partial, its own silos' JSON
    records in the job's store and the round's plan, globals, result and HEAD in its region's store, and
    reads no other region's silos; the server's and the UI's touch no region's own store; the UI's
    writes nothing."""
    keys = JobKeys(result.job)
    region_of = {silo: region for region, silos in where.region_silos.items() for silo in silos}
    server_keys = (keys.head, keys.registry(1), keys.server_state(1), keys.lost("run"))
    round_keys = [k for r in (1, 12) for k in (keys.plan(r), keys.global_model(r), keys.result(r))]
    for store in where.every:
        for r in (1, 12):
            for other in where.silos:
                for key_of in per_silo_keys(keys):
                    arn = store.arn(key_of(r, other))
                    for silo, name in result.silo_names.items():
                        for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject"):
                            _expect(result, name, action, arn, other == silo and store == where.silos[silo])
                    for region, name in result.region_names.items():
                        own = region_of.get(other) == region
                        home = where.regions[region] or where.job
                        _expect(result, name, "s3:GetObject", arn,
                                own and (store == home or (store == where.job and key_of != keys.update)))
                        _expect(result, name, "s3:PutObject", arn, own and store == where.job != home
                                and key_of != keys.update)
            for region in where.regions:
                for key in (keys.partial(r, region), keys.partial_record(r, region)):
                    for name in [*result.silo_names.values(), result.ui]:
                        _expect(result, name, "s3:PutObject", store.arn(key), False)
                    for other, name in result.region_names.items():
                        _expect(result, name, "s3:PutObject", store.arn(key), other == region and store == where.job)
        for key in (*server_keys, *round_keys):
            for name in [*result.silo_names.values(), result.ui]:
                _expect(result, name, "s3:PutObject", store.arn(key), False)
            for region, name in result.region_names.items():  # copies the round (and HEAD) down into its own store
                own_store = store == where.regions[region]
                _expect(result, name, "s3:PutObject", store.arn(key),
                        (key in round_keys or key == keys.head) and own_store)
        if store not in where.global_tier:  # a region's own store: the global tier never reaches it
            for key in (keys.update(1, "x"), keys.plan(1), keys.head):
                for name in (result.server, result.ui):
                    for action in ("s3:GetObject", "s3:PutObject"):
                        _expect(result, name, action, store.arn(key), False)


# -- the other half: each identity's key must reach only that identity's pods -----------------------
def credential_sharing(spec: JobSpec) -> list[str]:
    """Where the spec's placements let one identity's pods hold another's store key, whatever the
    policies say: a Secret named by several placements in one namespace, and namespaces several
    identities share (a pod may mount any Secret of its namespace), regional aggregators and the
    ``store_secrets`` of regions included. Meant as warnings: a Secret
    shared on purpose (e.g. an image registry's) is not a store key. Only the kubernetes runner
    keeps identities apart: the local one runs every step with the worker's environment."""
    if spec.runner != "kubernetes":
        return []
    secrets: dict[tuple[str | None, str | None, str], list[str]] = {}
    namespaces: dict[tuple[str | None, str | None], list[str]] = {}
    placements: list[tuple[str, Placement, list[SecretRef]]] = [("the server steps", spec.placement, [])]
    placements += [(f"silo {s.name}", s.placement, store_secrets(spec, silo=s.name)) for s in spec.silos]
    placements += [(f"region {r.name}'s aggregator", r.placement, list(r.store_secrets)) for r in spec.regions]
    for who, placement, region_secrets in placements:  # a region's store_secrets reach its silos and aggregator
        where = (placement.kubernetes_conn_id, placement.namespace)
        namespaces.setdefault(where, []).append(who)
        for secret in dict.fromkeys(ref.secret for ref in [*placement.secrets, *region_secrets]):
            secrets.setdefault((*where, secret), []).append(who)
    problems = [f"Secret {secret!r} (namespace {ns or 'default'}) is given to {' and '.join(who)}: if it holds "
                "store credentials, each needs a key (and Secret) of its own"
                for (_, ns, secret), who in secrets.items() if len(who) > 1]
    problems += [f"{' and '.join(who)} run in one namespace ({ns or 'default'}): their pods could mount each "
                 "other's Secrets; give each silo a namespace of its own"
                 for (_, ns), who in namespaces.items() if len(who) > 1]
    return problems
