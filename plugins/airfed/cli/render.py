"""``airfed render SPEC [--runner kubernetes]``: the pod manifests of one round, as multi-document YAML.

See :mod:`airfed.runners.pod_manifests` for how the pods are built (offline, no cluster).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from airfed.cli.terminal import stdout_to_stderr
from fl_tasks.spec import JobSpec

DEFAULT_IMAGE = "airfed/fl-task:latest"
DEFAULT_RUN_ID = "manual__2025-01-01T00:00:00+00:00"


def kubernetes_spec(spec: JobSpec, image: str | None = None) -> JobSpec:
    """``spec`` with the kubernetes runner and an image (``image``, else the spec's, else the default)."""
    return spec.model_copy(update={"runner": "kubernetes", "image": image or spec.image or DEFAULT_IMAGE})


def render(ns: argparse.Namespace) -> int:
    from airfed.environment import configure
    from airfed.spec import load_spec

    spec = load_spec(ns.spec)
    runner = ns.runner or spec.runner
    if runner != "kubernetes":
        print(
            f"airfed render: {ns.spec} uses runner {spec.runner!r}, which starts no pods; "
            "pass --runner kubernetes to render the pods it would run on Kubernetes",
            file=sys.stderr,
        )
        return 2
    if "AIRFED_STORE_URL" not in spec.env and not all("AIRFED_STORE_URL" in s.env for s in spec.silos):
        print(
            "airfed render: note: the spec's env sets no AIRFED_STORE_URL, so each pod would use a "
            "pod-local store; set an s3:// store in `env:` for pods to share the round",
            file=sys.stderr,
        )
    # Airflow reads its configuration on import: keep it under AIRFED_HOME, and keep its logging
    # (the provider logs every pod it builds) off stdout, which carries only the YAML.
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    configure()
    from airfed.runners.pod_manifests import render_round, to_yaml

    with stdout_to_stderr() as out:
        pods = render_round(kubernetes_spec(spec, ns.image), round_number=ns.round, run_id=ns.run_id)
        out.write(to_yaml(pods))
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "render", help="print the pod manifests of one round (every step, every silo) as multi-document YAML"
    )
    parser.add_argument("spec")
    parser.add_argument("--runner", choices=("local", "kubernetes"), default=None,
                        help="override the spec's runner (pods exist only for kubernetes)")
    parser.add_argument("--image", default=None,
                        help=f"the fl-task image (default: the spec's image, else {DEFAULT_IMAGE})")
    parser.add_argument("--round", type=int, default=1,
                        help="round number standing in for the distribute step's choice (default 1)")
    parser.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the DAG run id in the pods' argv")
    parser.set_defaults(func=render)
