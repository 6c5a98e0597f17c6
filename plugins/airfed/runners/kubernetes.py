"""The kubernetes runner: every step of a round is a pod running the StepCall's argv.

Each step becomes a ``KubernetesPodOperator`` with the StepCall's argv as ``cmds``/``arguments`` and
its env as the container env, exactly what the local runner executes as a subprocess. Server-side
steps (distribute, aggregate, register) run with the job's top-level ``placement``; per-silo steps
(train, validate, evaluate) are one task mapped over the silos with
``.partial(...).expand_kwargs(...)``, each map index carrying its silo's own placement: Airflow
connection (so each silo may be a different cluster), namespace, service account, node selector,
tolerations, resources (GPU limits included), image pull secrets and Secret refs.

Credentials reach pods only as references to Kubernetes Secrets (``secretKeyRef`` / ``envFrom``);
the spec validator already refuses credential-like names in literal ``env``. Server steps push
their JSON result as XCom through the provider's sidecar (the step writes it to
``/airflow/xcom/return.json``, named by ``AIRFED_RESULT_FILE``): the other steps of the round
template the round number out of the distribute step's XCom.

Parse-time cheap: only the provider and the kubernetes client models are imported.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from kubernetes.client import models as k8s

from airfed.links import step_links
from airfed.runners.slots import RoundSlotGuard
from fl_tasks.contract import RESULT_FILE_ENV, SERVER_STEPS, SKIP_EXIT_CODE, Placement, StepCall
from fl_tasks.spec import JobSpec

#: Where the provider's xcom sidecar reads a pod's result from (``PodDefaults.XCOM_MOUNT_PATH``).
XCOM_RESULT_FILE = f"{PodDefaults.XCOM_MOUNT_PATH}/return.json"
#: The provider's default connection, used when a placement names none.
DEFAULT_CONN_ID = "kubernetes_default"
#: Image pulls of a torch image are slow; a pod may wait this long to be scheduled and started.
STARTUP_TIMEOUT_SECONDS = 900
LABEL_PREFIX = "airfed"

#: Restricted-profile friendly defaults (the fl-task image runs as a numeric non-root user).
POD_SECURITY_CONTEXT: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
SIDECAR_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 65534,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def secret_objects(refs: list[dict[str, str]]) -> list[Secret]:
    """Spec Secret refs as the provider's ``Secret``: one key → ``secretKeyRef``, no key → ``envFrom``."""
    secrets = []
    for ref in refs:
        if ref.get("key"):
            secrets.append(Secret("env", ref.get("env") or ref["key"], ref["secret"], ref["key"]))
        else:
            secrets.append(Secret("env", None, ref["secret"]))
    return secrets


def volume_objects(volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]):
    """Volumes and mounts given in Kubernetes API form (as in a Pod manifest) as client models."""
    pod = PodGenerator.deserialize_model_dict(
        {"spec": {"volumes": volumes, "containers": [{"name": "base", "volumeMounts": mounts}]}}
    )
    return list(pod.spec.volumes or []), list(pod.spec.containers[0].volume_mounts or [])


class FlStepPodOperator(RoundSlotGuard, KubernetesPodOperator):
    """A ``KubernetesPodOperator`` running one airfed step, taking its placement as plain data.

    Secret refs, resources and image pull secrets arrive as JSON-friendly values (dicts, strings)
    and become the provider's objects here, so the per-silo ``expand_kwargs`` list serialises
    cleanly into the DAG Airflow stores (k8s model objects there would be stringified).
    """

    ui_color = "#e4ecf7"
    operator_extra_links = step_links()  # MLflow round run + registered model version
    #: The env is not a template, exactly as in the local runner: only the argv is (run id, round).
    #: The spec JSON in the distribute step's env may hold any text, braces included.
    template_fields = tuple(f for f in KubernetesPodOperator.template_fields if f != "env_vars")

    def __init__(
        self,
        *,
        step: str,
        silo: str | None = None,
        secret_refs: list[dict[str, str]] | None = None,
        container_resources: dict[str, dict[str, str]] | k8s.V1ResourceRequirements | None = None,
        image_pull_secrets: list[str] | list[k8s.V1LocalObjectReference] | str | None = None,
        secrets: list[Secret] | None = None,
        volume_specs: list[dict[str, Any]] | None = None,
        volume_mount_specs: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if volume_specs or volume_mount_specs:
            volumes, mounts = volume_objects(volume_specs or [], volume_mount_specs or [])
            kwargs["volumes"] = [*(kwargs.get("volumes") or []), *volumes]
            kwargs["volume_mounts"] = [*(kwargs.get("volume_mounts") or []), *mounts]
        if isinstance(container_resources, dict):
            container_resources = k8s.V1ResourceRequirements(
                requests=container_resources.get("requests") or None,
                limits=container_resources.get("limits") or None,
            ) if container_resources else None
        if isinstance(image_pull_secrets, list | tuple):
            image_pull_secrets = [
                k8s.V1LocalObjectReference(name=s) if isinstance(s, str) else s for s in image_pull_secrets
            ]
        super().__init__(
            container_resources=container_resources,
            image_pull_secrets=image_pull_secrets or None,
            secrets=[*(secrets or []), *secret_objects(secret_refs or [])],
            **kwargs,
        )
        self.step = step
        self.silo = silo
        self.secret_refs = list(secret_refs or [])


def _current_slot() -> int | None:
    """The round slot of the task group being built (``round_<slot>``), if any."""
    try:
        from airflow.sdk.definitions._internal.contextmanager import TaskGroupContext
    except ImportError:  # pragma: no cover - private SDK module moved
        return None
    group = TaskGroupContext.get_current()
    group_id = getattr(group, "group_id", None) or ""
    prefix = "round_"
    return int(group_id[len(prefix):]) if group_id.startswith(prefix) and group_id[len(prefix):].isdigit() else None


def _labels(spec: JobSpec, step: str, silo: str | None, slot: int | None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "fl-task",
        "app.kubernetes.io/part-of": "airfed",
        f"{LABEL_PREFIX}/job": spec.job,
        f"{LABEL_PREFIX}/step": step,
        f"{LABEL_PREFIX}/role": "silo" if silo else "server",
    }
    if silo:
        labels[f"{LABEL_PREFIX}/silo"] = silo
    if slot is not None:
        labels[f"{LABEL_PREFIX}/round-slot"] = str(slot)
    return labels


def _pod_name(spec: JobSpec, step: str, silo: str | None) -> str:
    # The provider lower-cases it, replaces other characters by '-' and appends a random suffix.
    return "-".join(p for p in (spec.job, step, silo) if p)


def placement_kwargs(placement: Placement) -> dict[str, Any]:
    """The operator kwargs of a placement, as plain data (safe in ``expand_kwargs``)."""
    kwargs: dict[str, Any] = {
        "kubernetes_conn_id": placement.kubernetes_conn_id or DEFAULT_CONN_ID,
        "namespace": placement.namespace,
        "service_account_name": placement.service_account_name,
        "node_selector": dict(placement.node_selector),
        "tolerations": [dict(t) for t in placement.tolerations],
        "container_resources": {k: dict(v) for k, v in placement.resources.items()},
        "image_pull_secrets": list(placement.image_pull_secrets),
        "secret_refs": [dict(s) for s in placement.secrets],
        "volume_specs": [dict(v) for v in placement.volumes],
        "volume_mount_specs": [dict(m) for m in placement.volume_mounts],
    }
    return kwargs


def pod_env(call: StepCall, xcom: bool) -> dict[str, str]:
    """The container env: the StepCall's env, plus where to write the XCom result."""
    env = dict(call.env)
    if xcom:
        env[RESULT_FILE_ENV] = XCOM_RESULT_FILE
    return env


def common_kwargs(spec: JobSpec, step: str, slot: int | None, silo: str | None = None) -> dict[str, Any]:
    """Kwargs every pod of a step shares (the ``partial`` of a mapped step)."""
    if not spec.image:
        raise ValueError("runner 'kubernetes' needs 'image' (the fl-task image)")
    xcom = step in SERVER_STEPS
    return {
        "task_id": step,
        "step": step,
        "image": spec.image,
        "image_pull_policy": "IfNotPresent",
        "labels": _labels(spec, step, silo, slot),
        "annotations": {f"{LABEL_PREFIX}/spec-sha256": spec.spec_hash()},
        "do_xcom_push": xcom,
        "get_logs": True,
        "log_events_on_failure": True,
        "on_finish_action": "delete_succeeded_pod",
        "skip_on_exit_code": SKIP_EXIT_CODE,
        "startup_timeout_seconds": STARTUP_TIMEOUT_SECONDS,
        "security_context": dict(POD_SECURITY_CONTEXT),
        "container_security_context": dict(CONTAINER_SECURITY_CONTEXT),
        "xcom_sidecar_container_security_context": dict(SIDECAR_SECURITY_CONTEXT),
    }


def silo_kwargs(spec: JobSpec, call: StepCall, slot: int | None) -> dict[str, Any]:
    """One map index of a per-silo step: the silo's argv, env, labels, name and placement."""
    return {
        "silo": call.silo,
        "name": _pod_name(spec, call.step, call.silo),
        "cmds": call.argv[:1],
        "arguments": call.argv[1:],
        "env_vars": pod_env(call, xcom=False),
        "labels": _labels(spec, call.step, call.silo, slot),
        **placement_kwargs(call.placement),
    }


def kubernetes_tasks(spec: JobSpec):
    """The operator factory of the kubernetes runner for ``spec`` (see ``airfed.runners``)."""

    def make(step: str, call: StepCall | list[StepCall], options: dict[str, Any] | None = None) -> Any:
        """``options``: Airflow task arguments from the builder (timeouts, retries, trigger rule)."""
        slot = _current_slot()
        if isinstance(call, StepCall):
            return FlStepPodOperator(
                **common_kwargs(spec, step, slot),
                name=_pod_name(spec, step, None),
                cmds=call.argv[:1],
                arguments=call.argv[1:],
                env_vars=pod_env(call, xcom=True),
                **placement_kwargs(call.placement),
                **(options or {}),
            )
        partial = common_kwargs(spec, step, slot)
        del partial["labels"]  # per silo (carries the silo label)
        return FlStepPodOperator.partial(
            **partial, map_index_template="{{ task.silo }}", **(options or {})
        ).expand_kwargs([silo_kwargs(spec, c, slot) for c in call])

    return make
