"""The pod manifests of one round on the kubernetes runner, rendered offline (``airfed render``).

Each pod is built from the round's StepCalls made with concrete values (a round number, a run id,
the spec's training config) instead of the DAG's templates, turned into the runner's own
``FlStepPodOperator`` exactly as in the DAG (``step_kwargs`` + ``pod_kwargs``), and made into a pod
by the provider's public ``build_pod_request_obj(dry_run=True)``, serialised with the kubernetes
client's ``ApiClient().sanitize_for_serialization``.

No cluster is contacted. The connection of each placement is read the public way, through
Airflow's secrets backends: an ``AIRFLOW_CONN_<ID>`` environment connection supplies its extras
(namespace, xcom sidecar image); a connection not defined in the environment is stood in for by an
empty ``kubernetes`` connection while rendering, so a pod without a spec namespace shows ``default``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from airfed.dag.builder import round_steps, task_options
from airfed.dag.step_calls import RoundRefs, round_calls
from airfed.runners.kubernetes import step_pod_operators
from fl_tasks.spec import JobSpec


@dataclass
class RenderedPod:
    """One pod of a round: the task it belongs to, where it runs, and its manifest (a plain dict)."""

    task_id: str
    step: str
    silo: str | None
    conn_id: str | None
    manifest: dict[str, Any]
    region: str | None = None


def connection_env_name(conn_id: str) -> str:
    """The environment variable Airflow reads connection ``conn_id`` from."""
    return f"AIRFLOW_CONN_{conn_id.upper()}"


@contextmanager
def stand_in_connections(conn_ids: set[str]) -> Iterator[None]:
    """Define each connection not given in the environment as an empty ``kubernetes`` connection."""
    added = [name for name in map(connection_env_name, sorted(conn_ids)) if name not in os.environ]
    for name in added:
        os.environ[name] = json.dumps({"conn_type": "kubernetes"})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def render_round(spec: JobSpec, *, round_number: int | str, run_id: str) -> list[RenderedPod]:
    """The pods of one round in DAG order; ``round_number`` stands in for distribute's choice."""
    from kubernetes.client import ApiClient

    if spec.runner != "kubernetes":
        raise ValueError(f"job {spec.job!r} uses runner {spec.runner!r}, which starts no pods")
    refs = RoundRefs(
        round=str(round_number), run_id=run_id, chain_id=run_id,
        training=json.dumps(dict(spec.training), sort_keys=True),
    )
    calls = round_calls(spec, refs)
    operators = [
        (step, op)
        for step in round_steps(spec)
        for op in step_pod_operators(spec, step, calls[step], task_options(spec, step))
    ]
    serialize = ApiClient().sanitize_for_serialization
    with stand_in_connections({op.kubernetes_conn_id for _, op in operators if op.kubernetes_conn_id}):
        return [
            RenderedPod(op.task_id, step, op.silo, op.kubernetes_conn_id,
                        serialize(op.build_pod_request_obj(dry_run=True)), getattr(op, "region", None))
            for step, op in operators
        ]


def to_yaml(pods: list[RenderedPod]) -> str:
    """Multi-document YAML, each document headed by a comment naming its task and connection."""
    import yaml

    docs = []
    for pod in pods:
        label = pod.silo or pod.region
        where = f"{pod.task_id}[{label}]" if label else pod.task_id
        header = f"# {where} | Airflow connection: {pod.conn_id}\n"
        docs.append("---\n" + header + yaml.safe_dump(pod.manifest, sort_keys=False, width=120))
    return "".join(docs)
