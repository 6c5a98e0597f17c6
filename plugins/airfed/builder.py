"""Build the Airflow DAG of a job spec: one task group per round slot.

Per round: gate → distribute → train (mapped over silos) → validate (mapped) → aggregate →
evaluate (mapped) → register. The gate skips slots beyond the trigger form's ``rounds`` param.
Parse-time cheap: no torch, flwr, mlflow or user-code imports.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Param, TaskGroup

from airfed.calls import round_calls
from airfed.spec import JobSpec

#: env override of how many round slots to unroll: ``airfed run --rounds N`` unrolls exactly N, so
#: no skipped slots slow its run down.
UNROLL_ENV = "AIRFED_UNROLL_ROUNDS"
START_DATE = datetime(2025, 1, 1, tzinfo=UTC)


def round_gate(slot: int, **context: Any) -> bool:
    """Run round slot ``slot`` only if the DAG run asked for at least that many rounds."""
    wanted = int(context["params"]["rounds"])
    print(f"round slot {slot}: {'runs' if slot <= wanted else 'skipped'} (this run asked for {wanted} rounds)")
    return slot <= wanted


def unrolled_rounds(spec: JobSpec) -> int:
    override = int(os.environ.get(UNROLL_ENV) or 0)
    return override if override > 0 else spec.unrolled_rounds


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
                    ignore_downstream_trigger_rules=False,
                )
                calls = round_calls(spec, slot)
                chain = [gate] + [factory(step, calls[step]) for step in
                                  ("distribute", "train", "validate", "aggregate", "evaluate", "register")]
                for upstream, downstream in zip(chain, chain[1:], strict=False):
                    upstream >> downstream
            if previous is not None:
                previous >> group
            previous = group
    return dag
