"""``airfed policies SPEC [--format aws|minio] [--store-url URL] [--region-store NAME=URL] [--out DIR]``.

The job's S3 policies.

Prints one JSON object: policy name -> policy document, one per silo (``<job>-silo-<silo>``), one
per regional aggregator in a job with regions (``<job>-region-<region>``), one for the server steps
(``<job>-server``) and a read-only one for the Airflow UI (``<job>-ui``). ``--region-store
NAME=s3://...`` gives a region's deployed store where the spec names a ``file://`` one.
With ``--out`` each is also written to ``DIR/<name>.json``, the file ``mc admin policy create`` and
``aws iam put-user-policy`` take (README, "Deploy"). See :mod:`fl_tasks.policies` for what each
policy allows and why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fl_tasks.policies import DEFAULT_STORE_URL, FORMATS, STORE_URL_ENV, PolicyError, credential_sharing, generate


def policies(ns: argparse.Namespace) -> int:
    from airfed.spec import load_spec

    spec = load_spec(ns.spec)
    default = ns.store_url or os.environ.get(STORE_URL_ENV, "")
    if not default.startswith("s3://"):
        default = ""
    if not default and STORE_URL_ENV not in spec.env and not all(STORE_URL_ENV in s.env for s in spec.silos):
        print(f"airfed policies: {ns.spec} names no s3:// store ({STORE_URL_ENV} in `env:`) and none was "
              f"given (--store-url); the policies below are for {DEFAULT_STORE_URL}", file=sys.stderr)
    try:
        result = generate(spec, ns.format, default or DEFAULT_STORE_URL, region_stores(ns.region_store))
    except PolicyError as exc:
        print(f"{ns.spec}: {exc}", file=sys.stderr)
        return 1
    for problem in credential_sharing(spec):
        print(f"airfed policies: warning: {ns.spec}: {problem}", file=sys.stderr)
    if ns.out:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, document in result.policies.items():
            (out / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
            print(f"{out / f'{name}.json'}: {result.stores[name]}", file=sys.stderr)
    print(json.dumps(result.policies, indent=2))
    return 0


def region_stores(pairs: list[str]) -> dict[str, str]:
    """``NAME=URL`` arguments as a dict (a malformed one is a PolicyError naming it)."""
    stores: dict[str, str] = {}
    for pair in pairs:
        name, sep, url = pair.partition("=")
        if not sep or not name or not url:
            raise PolicyError(f"--region-store {pair!r}: expected NAME=s3://bucket/prefix")
        stores[name] = url
    return stores


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "policies",
        help="print the job's least-privilege S3 policies: one per silo and per region, the server's, the UI's",
    )
    parser.add_argument("spec")
    parser.add_argument("--format", choices=FORMATS, default="aws",
                        help="aws: IAM policies (silos and UI may list the job's keys, so a missing key "
                             "reads as 404); minio: MinIO policies (no listing needed). Default aws")
    parser.add_argument("--store-url", default=None,
                        help=f"s3://bucket/prefix where the spec's env sets no {STORE_URL_ENV} "
                             f"(default: ${STORE_URL_ENV}, else {DEFAULT_STORE_URL})")
    parser.add_argument("--region-store", action="append", default=[], metavar="NAME=URL",
                        help="the s3://bucket/prefix store of region NAME, where the spec's regions[].store "
                             "is not one (a file:// store on a dev machine); repeat per region")
    parser.add_argument("--out", default=None, help="also write each policy to OUT/<name>.json")
    parser.set_defaults(func=policies)
