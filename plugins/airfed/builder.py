"""Build the Airflow DAG of a job spec: one task group per round slot.

Per round: gate → distribute → train (mapped over silos) → validate (mapped) → aggregate →
evaluate (mapped) → register. The gate skips slots beyond the trigger form's ``rounds`` param.
Parse-time cheap: no torch, flwr, mlflow or user-code imports.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Asset, Param, TaskGroup

from airfed.calls import round_calls
from fl_tasks.contract import SILO_STEPS
from fl_tasks.spec import JobSpec

#: env override of how many round slots to unroll: ``airfed run --rounds N`` unrolls exactly N, so
#: no skipped slots slow its run down.
UNROLL_ENV = "AIRFED_UNROLL_ROUNDS"
START_DATE = datetime(2025, 1, 1, tzinfo=UTC)
#: Airflow's execution_timeout is a backstop this much after the step's own timeout, which lets the
#: step record why it stopped ("timed out") before Airflow kills it.
TIMEOUT_GRACE_SECONDS = 60
#: Steps that run whatever the state of their upstream tasks: validate records "no update" for a
#: silo whose training failed, aggregate applies the quorum to whatever updates exist, register
#: records the round once aggregate committed it even if a silo's evaluation failed.
ALL_DONE_STEPS = ("validate", "aggregate", "register")


def round_gate(slot: int, **context: Any) -> bool:
    """Run round slot ``slot`` only if the DAG run asked for at least that many rounds."""
    wanted = int(context["params"]["rounds"])
    print(f"round slot {slot}: {'runs' if slot <= wanted else 'skipped'} (this run asked for {wanted} rounds)")
    return slot <= wanted


def unrolled_rounds(spec: JobSpec) -> int:
    override = int(os.environ.get(UNROLL_ENV) or 0)
    return override if override > 0 else spec.unrolled_rounds


def model_asset(spec: JobSpec) -> Asset:
    """The Asset a committed round updates: schedule another DAG on it (``schedule=[model_asset]``)."""
    return Asset(name=f"airfed.{spec.job}.model", uri=f"airfed://{spec.job}/{spec.model_name}", group="airfed")


def task_options(spec: JobSpec, step: str) -> dict[str, Any]:
    """Airflow task arguments of a step: timeout, retries with backoff, trigger rule."""
    ex = spec.execution
    timeout = ex.silo_timeout_seconds if step in SILO_STEPS else ex.server_timeout_seconds
    options: dict[str, Any] = {
        "execution_timeout": timedelta(seconds=timeout + TIMEOUT_GRACE_SECONDS),
        "retries": ex.retries,
        "retry_delay": timedelta(seconds=ex.retry_delay_seconds),
        "retry_exponential_backoff": ex.retry_exponential_backoff,
        "max_retry_delay": timedelta(seconds=ex.max_retry_delay_seconds),
    }
    if step in ALL_DONE_STEPS:
        options["trigger_rule"] = "all_done"
    if step == "register":  # succeeds only for a committed round: one Asset event per new global
        options["outlets"] = [model_asset(spec)]
    return options


def _doc(spec: JobSpec, spec_path: Path) -> str:
    silos = ", ".join(f"`{s.name}`" for s in spec.silos)
    return (
        f"### airfed job `{spec.job}`\n\n{spec.description}\n\n"
        f"- spec: `{spec_path}` (sha256 `{spec.spec_hash()[:12]}`)\n"
        f"- client app: `{spec.client_app}`; strategy: `{spec.strategy.name}`; silos: {silos}\n"
        f"- registry model: `{spec.model_name}` (alias `champion`); runner: `{spec.runner}`\n"
    )


def build_dag(spec: JobSpec, spec_path: str | Path) -> DAG:
    from airfed.runners import operator_factory

    unroll = unrolled_rounds(spec)
    factory = operator_factory(spec)
    with DAG(
        dag_id=spec.job,
        description=spec.description or f"airfed federated job {spec.job}",
        schedule=spec.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=False,
        tags=["airfed", *spec.tags],
        doc_md=_doc(spec, Path(spec_path)),
        params={
            "rounds": Param(
                min(spec.rounds_per_run, unroll), type="integer", minimum=1, maximum=unroll,
                description=f"Federated rounds in this run (1..{unroll}).",
            ),
            "training": Param(
                dict(spec.training), type="object",
                description="Training config sent to the ClientApp (overrides the spec's `training`).",
            ),
        },
        default_args={"owner": "airfed"},
    ) as dag:
        previous = None
        for slot in range(1, unroll + 1):
            with TaskGroup(group_id=f"round_{slot}", tooltip=f"federated round slot {slot}") as group:
                gate = ShortCircuitOperator(
                    task_id="gate", python_callable=round_gate, op_kwargs={"slot": slot},
                    # skip every later task of the run: all_done steps (aggregate, register) must not run
                    # in a slot beyond the requested rounds (mapped ones skip themselves: runners/slots.py)
                    ignore_downstream_trigger_rules=True,
                )
                calls = round_calls(spec, slot)
                steps = ("distribute", "train", "validate", "aggregate", "evaluate", "register")
                chain = [gate] + [factory(step, calls[step], task_options(spec, step)) for step in steps]
                for upstream, downstream in zip(chain, chain[1:], strict=False):
                    upstream >> downstream
            if previous is not None:
                previous >> group
            previous = group
    return dag
