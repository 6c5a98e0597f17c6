"""Build the Airflow DAG of a job spec: one DAG run is one federated round.

    distribute → train (mapped over silos) → validate (mapped) → aggregate → evaluate (mapped)
    → register → model_event → next_round (and, beside it, request_approval when
    ``promotion.approval: required``; see ``airfed.dag.approval``)

A run asking for more rounds (the ``rounds`` param) chains them: ``next_round`` triggers the next
run of the same DAG with ``rounds - 1`` once this round committed, and ``max_active_runs=1`` queues
it behind the current one. Each round starts from HEAD, so the chain trains one model.

This module owns the step order (``fl_tasks.contract.ROUND_STEPS``) and the task naming (a step's
task id is its name); everything else asks it. Parse-time cheap: no torch, flwr, mlflow or user code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, chain

from airfed.dag.model_event import ModelEventOperator
from airfed.dag.next_round import NextRoundOperator
from airfed.dag.step_calls import RoundRefs, round_calls
from fl_tasks.contract import REGIONAL_ROUND_STEPS, ROUND_STEPS, SILO_STEPS, STEPS
from fl_tasks.spec import JobSpec

START_DATE = datetime(2025, 1, 1, tzinfo=UTC)
#: Airflow's execution_timeout (and a pod's activeDeadlineSeconds) is a backstop this much after the
#: step's own timeout, which lets the step record why it stopped ("timed out") before it is killed.
TIMEOUT_GRACE_SECONDS = 60
#: Steps that run whatever the state of their upstream tasks: validate records "no update" for a
#: silo whose training failed, aggregate applies the quorum to whatever updates exist, register
#: records the round once aggregate committed it even if a silo's evaluation failed.
ALL_DONE_STEPS = ("validate", "aggregate", "register", "aggregate_region", "collect_region")
#: In a job with regions, also the silo steps that follow a regional-tier step: a region that is down
#: (its distribute_region or publish_region failed) must not stop the other regions' silos, which a
#: mapped upstream with one failed instance would; the down region's silos fail on their own.
REGIONAL_ALL_DONE_STEPS = ("train", "evaluate")
NEXT_ROUND_TASK_ID = "next_round"
#: After register: the model Asset event, its extra read from register's result (airfed.dag.model_event).
MODEL_EVENT_TASK_ID = "model_event"


def task_id(step: str) -> str:
    """The task id of a step (its name: one DAG run is one round; ``promote`` is the approval DAG's)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    return step


def round_steps(spec: JobSpec) -> tuple[str, ...]:
    """The steps of one round of ``spec`` in order: with the regional tier when the job has regions."""
    return REGIONAL_ROUND_STEPS if spec.regions else ROUND_STEPS


#: What the StepCalls of a DAG hold: Jinja that Airflow resolves per run. The round number is the
#: one distribute chose (its XCom); the chain id is the first run of a chain of rounds.
TEMPLATED_REFS = RoundRefs(
    round="{{ ti.xcom_pull(task_ids='" + task_id("distribute") + "')['round'] }}",
    run_id="{{ run_id }}",
    chain_id="{{ (dag_run.conf or {}).get('chain_id') or run_id }}",
    training="{{ params.training | tojson }}",
)


def model_asset(spec: JobSpec) -> Asset:
    """The Asset a committed round updates: schedule another DAG on it (``schedule=[model_asset]``)."""
    return Asset(name=f"airfed.{spec.job}.model", uri=f"airfed://{spec.job}/{spec.model_name}", group="airfed")


def step_timeout(spec: JobSpec, step: str) -> timedelta:
    """The hard limit of a step: its own timeout plus the grace. Airflow's execution_timeout and the
    kubernetes runner's activeDeadlineSeconds are this one value."""
    ex = spec.execution
    seconds = ex.silo_timeout_seconds if step in SILO_STEPS else ex.server_timeout_seconds
    return timedelta(seconds=seconds + TIMEOUT_GRACE_SECONDS)


def task_options(spec: JobSpec, step: str) -> dict[str, Any]:
    """Airflow task arguments of a step: task id, timeout, retries with backoff, trigger rule, outlets."""
    ex = spec.execution
    options: dict[str, Any] = {
        "task_id": task_id(step),
        "execution_timeout": step_timeout(spec, step),
        "retries": ex.retries,
        "retry_delay": timedelta(seconds=ex.retry_delay_seconds),
        "retry_exponential_backoff": ex.retry_exponential_backoff,
        "max_retry_delay": timedelta(seconds=ex.max_retry_delay_seconds),
    }
    if step in ALL_DONE_STEPS or (spec.regions and step in REGIONAL_ALL_DONE_STEPS):
        options["trigger_rule"] = "all_done"
    return options


def dag_params(spec: JobSpec) -> dict[str, Param]:
    """The trigger form: how many rounds (this run and the ones it chains) and the training config."""
    return {
        "rounds": Param(
            spec.rounds_per_run, type="integer", minimum=1, maximum=spec.max_rounds,
            description=f"Federated rounds to perform (1..{spec.max_rounds}): this run does one and "
                        "triggers the next run of the job with one fewer.",
        ),
        "training": Param(
            dict(spec.training), type="object",
            description="Training config sent to the ClientApp (overrides the spec's `training`).",
        ),
    }


def _doc(spec: JobSpec, spec_path: Path) -> str:
    silos = ", ".join(f"`{s.name}`" for s in spec.silos[:20]) + (", …" if len(spec.silos) > 20 else "")
    return (
        f"### airfed job `{spec.job}`\n\n{spec.description}\n\n"
        f"- spec: `{spec_path}` (sha256 `{spec.spec_hash()[:12]}`)\n"
        f"- client app: `{spec.client_app}`; strategy: `{spec.strategy.name}`; "
        f"{len(spec.silos)} silos: {silos}\n"
        f"- registry model: `{spec.model_name}` (alias `champion`); runner: `{spec.runner}`\n"
        f"- one run = one round; `rounds` > 1 chains the next run (`{NEXT_ROUND_TASK_ID}`)\n"
    )


def build_dag(spec: JobSpec, spec_path: str | Path) -> DAG:
    """The DAG of ``spec``: the round's steps in order, then the trigger of the next round."""
    from airfed.runners import operator_factory

    make_task = operator_factory(spec)
    calls = round_calls(spec, TEMPLATED_REFS)
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
        params=dag_params(spec),
        default_args={"owner": "airfed"},
    ) as dag:
        steps = [make_task(step, calls[step], task_options(spec, step)) for step in round_steps(spec)]
        # register succeeds only for a committed round: one model Asset event per new global
        event = ModelEventOperator(task_id=MODEL_EVENT_TASK_ID, asset=model_asset(spec), source_task_id="register")
        next_round = NextRoundOperator(task_id=NEXT_ROUND_TASK_ID, trigger_dag_id=spec.job)
        chain(*steps, event, next_round)
        if spec.promotion.approval == "required":  # beside next_round: rounds never wait on a person
            from airfed.dag.approval import request_approval_task

            event >> request_approval_task(spec, task_id("register"))
    return dag
