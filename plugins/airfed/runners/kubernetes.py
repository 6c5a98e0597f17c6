"""The kubernetes runner: every step of a round is a pod running the StepCall's argv.

Each step becomes a ``KubernetesPodOperator`` with the StepCall's argv as ``cmds``/``arguments`` and
its env as the container env, exactly what the local runner executes as a subprocess. Server-side
steps (distribute, aggregate, register) run with the job's top-level ``placement``; per-silo steps
(train, validate, evaluate) are one task mapped over the silos with
``.partial(...).expand_kwargs(...)``, each map index carrying its silo's own placement: Airflow
connection (so each silo may be a different cluster), namespace, service account, node selector,
tolerations, resources (GPU limits included), image pull secrets, Secret refs and volumes.

The spec's ``Placement`` travels as plain data (it must serialise into the stored DAG) and becomes
pod arguments in one place, :func:`placement_pod_kwargs`, when the operator is created.

Every pod has ``activeDeadlineSeconds`` = the step's hard limit (its timeout plus grace, the same
value as the task's ``execution_timeout``), so the cluster stops a pod that outlives it even when
Airflow does not watch the clock (a deferred task). ``kubernetes.deferrable: true`` in the spec runs
silo pods deferrable: their tasks wait in the triggerer instead of holding worker slots.

Credentials reach pods only as references to Kubernetes Secrets (``secretKeyRef`` / ``envFrom``);
the spec validator already refuses credential-like names in literal ``env``. Server steps push
their JSON result as XCom through the provider's sidecar (the step writes it to
``/airflow/xcom/return.json``, named by ``AIRFED_RESULT_FILE``): the other steps of the round
template the round number out of the distribute step's XCom.

Parse-time cheap: only the provider and the kubernetes client models are imported.
"""

from __future__ import annotations

import re
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from kubernetes.client import models as k8s

from airfed.runners import OperatorFactory
from airfed.ui.links import step_links
from fl_tasks.contract import REGION_STEPS, RESULT_FILE_ENV, SERVER_STEPS, SILO_STEPS, SKIP_EXIT_CODE, StepCall
from fl_tasks.regions import REGION_ENV_PREFIX
from fl_tasks.spec import JobSpec, Placement, SecretRef

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


def secret_object(ref: SecretRef) -> Secret:
    """A spec Secret ref as the provider's ``Secret``: one key → ``secretKeyRef``, no key → ``envFrom``."""
    if ref.key:
        return Secret("env", ref.env or ref.key, ref.secret, ref.key)
    return Secret("env", None, ref.secret)


def region_secret_kwargs(refs: list[SecretRef]) -> dict[str, list[Any]]:
    """A regional-tier pod's region-store credentials under ``AIRFED_REGION_`` (``fl_tasks.regions``): one key
    → ``secretKeyRef`` with the prefixed name, no key → ``envFrom`` with the prefix. Its own key to the
    job's store stays in the placement's plain ``AWS_*``; in one pod, the two never overwrite each other."""
    return {
        "secrets": [Secret("env", REGION_ENV_PREFIX + (ref.env or ref.key), ref.secret, ref.key)
                    for ref in refs if ref.key],
        "env_from": [k8s.V1EnvFromSource(prefix=REGION_ENV_PREFIX, secret_ref=k8s.V1SecretEnvSource(name=ref.secret))
                     for ref in refs if not ref.key],
    }


def placement_pod_kwargs(placement: Placement) -> dict[str, Any]:
    """The one conversion of a spec ``Placement`` into ``KubernetesPodOperator`` arguments.

    Tolerations, volumes and mounts are given in Kubernetes API form (as in a Pod manifest) and
    become client models through the provider's ``PodGenerator.deserialize_model_dict``.
    """
    pod = PodGenerator.deserialize_model_dict({"spec": {
        "tolerations": placement.tolerations,
        "volumes": placement.volumes,
        "containers": [{"name": "base", "volumeMounts": placement.volume_mounts}],
    }})
    resources = {kind: {k: str(v) for k, v in values.items()} for kind, values in placement.resources.items()}
    return {
        "kubernetes_conn_id": placement.kubernetes_conn_id or DEFAULT_CONN_ID,
        "namespace": placement.namespace,
        "service_account_name": placement.service_account_name,
        "node_selector": dict(placement.node_selector),
        "tolerations": list(pod.spec.tolerations or []),
        "container_resources": k8s.V1ResourceRequirements(
            requests=resources.get("requests"), limits=resources.get("limits")
        ) if resources else None,
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=s) for s in placement.image_pull_secrets],
        "secrets": [secret_object(ref) for ref in placement.secrets],
        "volumes": list(pod.spec.volumes or []),
        "volume_mounts": list(pod.spec.containers[0].volume_mounts or []),
    }


class FlStepPodOperator(KubernetesPodOperator):
    """A ``KubernetesPodOperator`` running one airfed step, its placement given as the spec's data.

    ``placement`` is a spec ``Placement`` or its JSON form (what a per-silo ``expand_kwargs`` list
    holds, so the DAG Airflow stores serialises cleanly); :func:`placement_pod_kwargs` turns it
    into the operator's pod arguments.
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
        placement: Placement | dict[str, Any] | None = None,
        region: str | None = None,
        region_secrets: list[SecretRef | dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        placement = placement if isinstance(placement, Placement) else Placement.model_validate(placement or {})
        pod = placement_pod_kwargs(placement)
        if region_secrets:
            refs = [r if isinstance(r, SecretRef) else SecretRef.model_validate(r) for r in region_secrets]
            extra = region_secret_kwargs(refs)
            pod["secrets"] = [*pod["secrets"], *extra["secrets"]]
            kwargs["env_from"] = [*(kwargs.get("env_from") or []), *extra["env_from"]]
        super().__init__(**pod, **kwargs)
        self.step = step
        self.silo = silo
        self.region = region


def pod_labels(spec: JobSpec, step: str, silo: str | None, region: str | None = None) -> dict[str, str]:
    """airfed's labels of a step's pod (the provider adds dag_id, task_id, run_id, map_index, try_number)."""
    labels = {
        "app.kubernetes.io/name": "fl-task",
        "app.kubernetes.io/part-of": "airfed",
        f"{LABEL_PREFIX}/job": spec.job,
        f"{LABEL_PREFIX}/step": step,
        f"{LABEL_PREFIX}/role": "silo" if silo else "server",
    }
    if silo:
        labels[f"{LABEL_PREFIX}/silo"] = silo
    if region:
        labels[f"{LABEL_PREFIX}/role"] = "region"
        labels[f"{LABEL_PREFIX}/region"] = region
    return labels


def pod_name(spec: JobSpec, step: str, silo: str | None) -> str:
    """``<job>-<step>[-<silo>]`` as a DNS label part (the provider appends a random suffix)."""
    name = "-".join(p for p in (spec.job, step, silo) if p)
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())


def pod_env(call: StepCall) -> dict[str, str]:
    """The container env: the StepCall's env, plus, for server steps, where to write the XCom result."""
    env = dict(call.env)
    if call.step in SERVER_STEPS:
        env[RESULT_FILE_ENV] = XCOM_RESULT_FILE
    return env


def step_kwargs(spec: JobSpec, step: str, options: dict[str, Any]) -> dict[str, Any]:
    """Arguments every pod of a step shares (the ``partial`` of a mapped step), with the task options."""
    if not spec.image:
        raise ValueError("runner 'kubernetes' needs 'image' (the fl-task image)")
    kwargs = {
        **options,
        "step": step,
        "image": spec.image,
        "image_pull_policy": "IfNotPresent",
        "annotations": {f"{LABEL_PREFIX}/spec-sha256": spec.spec_hash()},
        "do_xcom_push": step in SERVER_STEPS,
        "get_logs": True,
        "log_events_on_failure": True,
        "on_finish_action": "delete_succeeded_pod",
        "skip_on_exit_code": SKIP_EXIT_CODE,
        "startup_timeout_seconds": STARTUP_TIMEOUT_SECONDS,
        "security_context": dict(POD_SECURITY_CONTEXT),
        "container_security_context": dict(CONTAINER_SECURITY_CONTEXT),
        "xcom_sidecar_container_security_context": dict(SIDECAR_SECURITY_CONTEXT),
    }
    if "execution_timeout" in options:
        kwargs["active_deadline_seconds"] = int(options["execution_timeout"].total_seconds())
    if step in SILO_STEPS and spec.kubernetes.deferrable:
        kwargs["deferrable"] = True
    return kwargs


def pod_kwargs(spec: JobSpec, call: StepCall) -> dict[str, Any]:
    """Arguments of one pod: the StepCall's argv and env, its labels, name and placement (plain data)."""
    placement = call.placement.model_dump(mode="json", exclude_defaults=True) if call.placement else {}
    kwargs: dict[str, Any] = {
        "silo": call.silo,
        "name": pod_name(spec, call.step, call.silo or call.region),
        "cmds": call.argv[:1],
        "arguments": call.argv[1:],
        "env_vars": pod_env(call),
        "labels": pod_labels(spec, call.step, call.silo, call.region),
        "placement": placement,
    }
    if call.region is not None:
        kwargs["region"] = call.region
    if call.region_secrets:
        kwargs["region_secrets"] = [ref.model_dump(mode="json", exclude_none=True) for ref in call.region_secrets]
    return kwargs


def step_pod_operators(spec: JobSpec, step: str, call: StepCall | list[StepCall],
                       options: dict[str, Any]) -> list[FlStepPodOperator]:
    """One unmapped operator per pod of a step (what ``airfed render`` builds pods from)."""
    calls = call if isinstance(call, list) else [call]
    return [FlStepPodOperator(**step_kwargs(spec, step, options), **pod_kwargs(spec, c)) for c in calls]


def kubernetes_tasks(spec: JobSpec) -> OperatorFactory:
    """The operator factory of the kubernetes runner for ``spec`` (see ``airfed.runners``)."""

    def make(step: str, call: StepCall | list[StepCall], options: dict[str, Any]) -> Any:
        """``options``: Airflow task arguments from the builder (task id, timeouts, retries, trigger rule)."""
        if isinstance(call, StepCall):
            return FlStepPodOperator(**step_kwargs(spec, step, options), **pod_kwargs(spec, call))
        label = "{{ task.region }}" if step in REGION_STEPS else "{{ task.silo }}"
        return FlStepPodOperator.partial(
            **step_kwargs(spec, step, options), map_index_template=label
        ).expand_kwargs([pod_kwargs(spec, c) for c in call])

    return make
