"""The step contract shared by the Airflow side and the step side.

Pure (stdlib only) on purpose: the DAG builder in ``airfed`` imports it at DAG-parse time, and a
pod or local subprocess receives exactly the argv built here. Both runners execute the same argv,
so a local run is the test of what a pod does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the spec's pydantic model; this module stays stdlib-only at run time
    from fl_tasks.spec import Placement, SecretRef

#: Steps of one federated round, in order. Per-silo steps map over the job's silos.
SERVER_STEPS = ("distribute", "aggregate", "register", "promote")
SILO_STEPS = ("train", "validate", "evaluate")
ROUND_STEPS = ("distribute", "train", "validate", "aggregate", "evaluate", "register")
#: Steps of the regional tier (jobs with ``regions``), each mapped over the regions and run in the
#: region's placement: they alone move objects between a region's store and the job's store.
REGION_STEPS = ("distribute_region", "aggregate_region", "publish_region", "collect_region")
#: Steps of one round of a job with regions, in order.
REGIONAL_ROUND_STEPS = (
    "distribute", "distribute_region", "train", "validate", "aggregate_region", "aggregate", "publish_region",
    "evaluate", "collect_region", "register",
)
#: Steps of a job's approval DAG (``promotion.approval: required``), after a person answered.
APPROVAL_STEPS = ("promote",)
#: Every step ``python -m fl_tasks`` runs.
STEPS = ROUND_STEPS + REGION_STEPS + APPROVAL_STEPS

#: Exit code of a step that has nothing to do (a silo not sampled this round): both runners mark
#: the task skipped (``skip_on_exit_code`` on Kubernetes) instead of failed.
SKIP_EXIT_CODE = 99
#: Env var a step writes its JSON result to (the local runner reads it; on Kubernetes it points at
#: the xcom sidecar's ``/airflow/xcom/return.json``). The result becomes the task's XCom.
RESULT_FILE_ENV = "AIRFED_RESULT_FILE"
#: Env var holding the job spec (validated, as JSON) for the distribute step.
SPEC_ENV = "AIRFED_SPEC"
#: Env var with the step's own time limit in seconds: the step stops itself and records
#: "timed out" before Airflow's execution_timeout (a little later) would kill it.
TIMEOUT_ENV = "AIRFED_STEP_TIMEOUT"


@dataclass(frozen=True)
class StepCall:
    """One invocation of ``python -m fl_tasks <step> ...``: what to run, with what env, where.

    ``placement`` is the spec's own ``Placement`` (the job's for server steps, the silo's for silo
    steps); the kubernetes runner converts it to pod arguments, the local runner ignores it.
    """

    step: str
    argv: list[str]
    env: dict[str, str]
    silo: str | None = None
    placement: Placement | None = None
    region: str | None = None
    #: A regional-tier step's region-store credentials (its ``store_secrets``), kept apart from the
    #: placement's own: the kubernetes runner exposes them under ``AIRFED_REGION_`` (``fl_tasks.regions``).
    region_secrets: tuple[SecretRef, ...] = ()

    def as_kwargs(self) -> dict:
        """JSON-friendly form, used as the mapped kwargs of a per-silo (or per-region) task."""
        kwargs = {"argv": list(self.argv), "env": dict(self.env), "silo": self.silo}
        if self.region is not None:
            kwargs["region"] = self.region
        return kwargs


def step_argv(
    step: str,
    *,
    job: str,
    round_ref: str,
    run_id: str,
    silo: str | None = None,
    region: str | None = None,
) -> list[str]:
    """The argv of a step. ``round_ref`` and ``run_id`` may be Jinja templates Airflow resolves at run time."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    argv = ["python", "-m", "fl_tasks", step, "--job", job, "--round", round_ref, "--run-id", run_id]
    if silo is not None:
        argv += ["--silo", silo]
    if region is not None:
        argv += ["--region", region]
    return argv


def approval_dag_id(job: str) -> str:
    """The DAG where a person approves a job's candidate versions (``promotion.approval: required``)."""
    return f"{job}__approval"


def approval_run_id(r: int, dag_run_id: str) -> str:
    """The approval DAG run of round ``r``'s candidate: named by the round's run, so the jobs page
    links to it and a retried trigger finds it."""
    return f"round_{r}__{dag_run_id}"
