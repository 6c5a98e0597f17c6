"""``airfed render SPEC [--runner kubernetes]``: the pod manifests of one round, as multi-document YAML.

The manifests are what the kubernetes runner would submit: the DAG is built exactly as Airflow
builds it, each step's ``KubernetesPodOperator`` (each map index of a per-silo step, unmapped the
way Airflow unmaps it) has its templates rendered against a plausible task context — a run id, the
DAG's default params, and a distribute XCom naming the round — and the provider's own
``build_pod_request_obj`` makes the pod, serialised with the kubernetes client's
``ApiClient().sanitize_for_serialization``. No cluster or Airflow connection is contacted: the
connection-derived values (a namespace or xcom sidecar image set in the connection's extras) are
not known offline, so a pod without a spec namespace shows ``default``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fl_tasks.spec import JobSpec

DEFAULT_IMAGE = "airfed/fl-task:latest"
DEFAULT_RUN_ID = "manual__2025-01-01T00:00:00+00:00"
STEP_ORDER = ("distribute", "train", "validate", "aggregate", "evaluate", "register")


@dataclass
class RenderedPod:
    """One pod of a round: the task it belongs to, where it runs, and its manifest (a plain dict)."""

    task_id: str
    step: str
    silo: str | None
    map_index: int
    conn_id: str | None
    manifest: dict[str, Any]


class _OfflineHook:
    """Stands in for the operator's ``KubernetesHook``: no connection lookups, no cluster."""

    def get_namespace(self) -> str | None:
        return None

    def get_xcom_sidecar_container_image(self) -> str | None:
        return None

    def get_xcom_sidecar_container_resources(self) -> dict | None:
        return None

    def get_xcom_sidecar_container_security_context(self) -> dict | None:
        return None


class _RenderTI:
    """The slice of a task instance that templates and pod labels read."""

    def __init__(self, dag_id: str, task_id: str, map_index: int, xcom: dict[str, Any]):
        self.dag_id, self.task_id, self.map_index, self.try_number = dag_id, task_id, map_index, 1
        self.run_id = None
        self.task: Any = None
        self._xcom = xcom

    def xcom_pull(self, task_ids: str | list[str] | None = None, key: str = "return_value", **_: Any) -> Any:
        """The distribute step's result (``{'round': N, ...}``); nothing else is pulled by the steps."""
        if key != "return_value":
            return None
        if isinstance(task_ids, list | tuple):
            return [self._xcom for _ in task_ids]
        return self._xcom


class _RenderDagRun:
    def __init__(self, run_id: str, conf: dict[str, Any]):
        self.run_id, self.conf, self.run_type = run_id, conf, "manual"


def kubernetes_spec(spec: JobSpec, image: str | None = None) -> JobSpec:
    """``spec`` with the kubernetes runner and an image (``image``, else the spec's, else the default)."""
    return spec.model_copy(update={"runner": "kubernetes", "image": image or spec.image or DEFAULT_IMAGE})


def _context(dag: Any, task: Any, ti: _RenderTI, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
    ti.task, ti.run_id = task, run_id
    dag_run = _RenderDagRun(run_id, {})
    return {
        "dag": dag, "task": task, "ti": ti, "task_instance": ti, "run_id": run_id, "dag_run": dag_run,
        "params": dict(params), "conf": None, "ds": "2025-01-01", "ts": "2025-01-01T00:00:00+00:00",
        "map_index_template": None,
    }


def _build_pod(op: Any, context: dict[str, Any]) -> dict[str, Any]:
    from kubernetes.client import ApiClient

    op.__dict__["hook"] = _OfflineHook()  # ``hook`` is a cached_property: pre-seed it
    op.name = op._set_name(op.name)  # what ``execute`` does before building the pod
    pod = op.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def render_round(
    spec: JobSpec,
    spec_path: str | Path,
    *,
    slot: int = 1,
    round_number: int | str = 1,
    run_id: str = DEFAULT_RUN_ID,
) -> list[RenderedPod]:
    """The pods of round slot ``slot``, in DAG order; ``round_number`` stands in for distribute's XCom."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    from airfed.builder import build_dag

    if spec.runner != "kubernetes":
        raise ValueError(f"job {spec.job!r} uses runner {spec.runner!r}, which starts no pods")
    dag = build_dag(spec, spec_path)
    params = {name: dag.params[name] for name in dag.params}
    xcom = {"round": round_number}
    pods: list[RenderedPod] = []
    for step in STEP_ORDER:
        task = dag.get_task(f"round_{slot}.{step}")
        if isinstance(task, MappedOperator):
            for index, _ in enumerate(task.expand_input.value):
                ti = _RenderTI(dag.dag_id, task.task_id, index, xcom)
                context = _context(dag, task, ti, run_id, params)
                task.render_template_fields(context)  # unmaps (Airflow's path) and renders in place
                op = context["task"]
                pods.append(RenderedPod(task.task_id, step, op.silo, index, op.kubernetes_conn_id,
                                        _build_pod(op, context)))
        else:
            op = task
            ti = _RenderTI(dag.dag_id, task.task_id, -1, xcom)
            context = _context(dag, op, ti, run_id, params)
            op.render_template_fields(context)
            pods.append(RenderedPod(task.task_id, step, None, -1, op.kubernetes_conn_id, _build_pod(op, context)))
    return pods


def to_yaml(pods: list[RenderedPod]) -> str:
    """Multi-document YAML, each document headed by a comment naming its task and connection."""
    import yaml

    docs = []
    for pod in pods:
        where = f"{pod.task_id}[{pod.silo}]" if pod.silo else pod.task_id
        header = f"# {where} | Airflow connection: {pod.conn_id or 'kubernetes_default'}\n"
        docs.append("---\n" + header + yaml.safe_dump(pod.manifest, sort_keys=False, width=120))
    return "".join(docs)


def _cmd_render(ns: argparse.Namespace) -> int:
    from airfed.environment import configure
    from airfed.spec_loader import load_spec

    spec = load_spec(ns.spec)
    runner = ns.runner or spec.runner
    if runner != "kubernetes":
        print(
            f"airfed render: {ns.spec} uses runner {spec.runner!r}, which starts no pods; "
            "pass --runner kubernetes to render the pods it would run on Kubernetes",
            file=sys.stderr,
        )
        return 2
    spec = kubernetes_spec(spec, ns.image)
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
    with _stdout_to_stderr() as out:
        pods = render_round(spec, ns.spec, round_number=ns.round, run_id=ns.run_id)
        out.write(to_yaml(pods))
    return 0


@contextmanager
def _stdout_to_stderr() -> Iterator[TextIO]:
    """Point fd 1 at stderr while rendering; yield a file on the real stdout for the YAML."""
    sys.stdout.flush()
    saved = os.dup(1)
    out = os.fdopen(os.dup(saved), "w")
    os.dup2(2, 1)
    try:
        yield out
    finally:
        out.flush()
        out.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def add_commands(subparsers: Any) -> None:
    """Add ``airfed render`` to the CLI's subparsers."""
    render = subparsers.add_parser(
        "render", help="print the pod manifests of one round (every step, every silo) as multi-document YAML"
    )
    render.add_argument("spec")
    render.add_argument("--runner", choices=("local", "kubernetes"), default=None,
                        help="override the spec's runner (pods exist only for kubernetes)")
    render.add_argument("--image", default=None,
                        help=f"the fl-task image (default: the spec's image, else {DEFAULT_IMAGE})")
    render.add_argument("--round", type=int, default=1,
                        help="round number standing in for the distribute step's XCom (default 1)")
    render.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the DAG run id templated into the pods")
    render.set_defaults(func=_cmd_render)
