"""Turn a job spec into the StepCalls of one round: the contract both runners execute.

The round number, run id, chain id and training config are given as ``RoundRefs``: Jinja templates
in a DAG (Airflow resolves them per run), concrete values when ``airfed render`` builds the pods of
one round.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_tasks import regions
from fl_tasks.contract import REGION_STEPS, SPEC_ENV, TIMEOUT_ENV, StepCall, step_argv
from fl_tasks.spec import JobSpec, Placement

#: The step's argument that distribute receives instead of a round number: it picks HEAD + 1.
NEXT_ROUND = "next"


@dataclass(frozen=True)
class RoundRefs:
    """What one round's argv refers to: templates (in a DAG) or concrete values (rendering)."""

    round: str
    run_id: str
    chain_id: str
    training: str


def job_env(spec: JobSpec) -> dict[str, str]:
    """The env every step of the job gets (silos add their own)."""
    return {"PYTHONUNBUFFERED": "1", **spec.env}


def round_calls(spec: JobSpec, refs: RoundRefs) -> dict[str, StepCall | list[StepCall]]:
    """StepCalls of one round, keyed by step name: one per server step, a list (per silo) per silo step."""
    common_env = job_env(spec)
    server_env = {**common_env, TIMEOUT_ENV: str(spec.execution.server_timeout_seconds)}
    silo_timeout = {TIMEOUT_ENV: str(spec.execution.silo_timeout_seconds)}

    def server_call(step: str, argv: list[str], extra_env: dict[str, str] | None = None) -> StepCall:
        return StepCall(step, argv, {**server_env, **(extra_env or {})}, None, spec.placement)

    def silo_calls(step: str) -> list[StepCall]:
        return [
            StepCall(
                step,
                step_argv(step, job=spec.job, round_ref=refs.round, run_id=refs.run_id, silo=silo.name),
                {**common_env, **silo.env, **silo_timeout, **regions.store_env(spec, step, silo=silo.name)},
                silo.name,
                _with_store_secrets(silo.placement, regions.store_secrets(spec, silo=silo.name)),
            )
            for silo in spec.silos
        ]

    def server_argv(step: str) -> list[str]:
        return step_argv(step, job=spec.job, round_ref=refs.round, run_id=refs.run_id)

    distribute_argv = step_argv("distribute", job=spec.job, round_ref=NEXT_ROUND, run_id=refs.run_id) + [
        "--chain-id", refs.chain_id, "--training", refs.training,
    ]
    calls: dict[str, StepCall | list[StepCall]] = {
        "distribute": server_call("distribute", distribute_argv, {SPEC_ENV: spec.step_payload()}),
        "train": silo_calls("train"),
        "validate": silo_calls("validate"),
        "aggregate": server_call("aggregate", server_argv("aggregate")),
        "evaluate": silo_calls("evaluate"),
        "register": server_call("register", server_argv("register")),
    }
    if spec.regions:
        calls.update({step: region_calls(spec, refs, step) for step in REGION_STEPS})
    return calls


def region_calls(spec: JobSpec, refs: RoundRefs, step: str) -> list[StepCall]:
    """One StepCall per region of a regional-tier step: the region's placement (its key to the job's
    store), its store's URL and, apart, its store's credentials (and those of no other region)."""
    env = {**job_env(spec), TIMEOUT_ENV: str(spec.execution.server_timeout_seconds)}
    return [
        StepCall(
            step,
            step_argv(step, job=spec.job, round_ref=refs.round, run_id=refs.run_id, region=region.name),
            {**env, **regions.store_env(spec, step, region=region.name)},
            None,
            region.placement,
            region=region.name,
            region_secrets=tuple(region.store_secrets),
        )
        for region in spec.regions
    ]


def _with_store_secrets(placement: Placement, secrets: list) -> Placement:
    """``placement`` with the region's store credentials added (unchanged for a silo outside regions)."""
    if not secrets:
        return placement
    return placement.model_copy(update={"secrets": [*placement.secrets, *secrets]})
