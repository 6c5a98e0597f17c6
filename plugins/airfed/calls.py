"""Turn a job spec into the StepCalls of one round slot: the contract both runners execute."""

from __future__ import annotations

from fl_tasks.contract import SPEC_ENV, TIMEOUT_ENV, Placement, StepCall, step_argv
from fl_tasks.spec import JobSpec
from fl_tasks.spec import Placement as PlacementSpec


def _placement(spec: PlacementSpec) -> Placement:
    return Placement(
        kubernetes_conn_id=spec.kubernetes_conn_id,
        namespace=spec.namespace,
        service_account_name=spec.service_account_name,
        node_selector=dict(spec.node_selector),
        tolerations=[dict(t) for t in spec.tolerations],
        resources={k: {rk: str(rv) for rk, rv in v.items()} for k, v in spec.resources.items()},
        image_pull_secrets=list(spec.image_pull_secrets),
        secrets=[s.model_dump(exclude_none=True) for s in spec.secrets],
        volumes=[dict(v) for v in spec.volumes],
        volume_mounts=[dict(m) for m in spec.volume_mounts],
    )


def distribute_task_id(slot: int) -> str:
    return f"round_{slot}.distribute"


def round_template(slot: int) -> str:
    """Jinja resolving to the absolute round number that this slot's distribute step chose."""
    return "{{ ti.xcom_pull(task_ids='" + distribute_task_id(slot) + "')['round'] }}"


def round_calls(spec: JobSpec, slot: int) -> dict[str, StepCall | list[StepCall]]:
    """StepCalls of round slot ``slot`` (1-based) of a DAG run, keyed by step name."""
    job_env = {"PYTHONUNBUFFERED": "1", **spec.env}
    server_env = {**job_env, TIMEOUT_ENV: str(spec.execution.server_timeout_seconds)}
    silo_timeout = {TIMEOUT_ENV: str(spec.execution.silo_timeout_seconds)}
    server = _placement(spec.placement)
    run_id = "{{ run_id }}"
    rnd = round_template(slot)

    def server_call(step: str, argv: list[str], extra_env: dict[str, str] | None = None) -> StepCall:
        return StepCall(step, argv, {**server_env, **(extra_env or {})}, None, server)

    def silo_calls(step: str) -> list[StepCall]:
        return [
            StepCall(
                step,
                step_argv(step, job=spec.job, round_ref=rnd, run_id=run_id, silo=silo.name),
                {**job_env, **silo.env, **silo_timeout},
                silo.name,
                _placement(silo.placement),
            )
            for silo in spec.silos
        ]

    distribute_argv = step_argv("distribute", job=spec.job, round_ref="next", run_id=run_id) + [
        "--slot", str(slot), "--training", "{{ params.training | tojson }}",
    ]
    return {
        "distribute": server_call("distribute", distribute_argv, {SPEC_ENV: spec.step_payload()}),
        "train": silo_calls("train"),
        "validate": silo_calls("validate"),
        "aggregate": server_call("aggregate", step_argv("aggregate", job=spec.job, round_ref=rnd, run_id=run_id)),
        "evaluate": silo_calls("evaluate"),
        "register": server_call("register", step_argv("register", job=spec.job, round_ref=rnd, run_id=run_id)),
    }
