"""Human approval of a job's candidate versions (``promotion.approval: required``).

Shape: a second DAG per job, ``<job>__approval``, one run per candidate::

    approve (Airflow HITL task: Approve / Reject + reason) → promote (step) → model_event

A round never waits on it: the round's ``request_approval`` task triggers the approval run (named
``round_<r>__<round run id>``, so the jobs page links to it and a retried trigger finds it) and the
round goes on. An approval task inside the round's run would keep that run open and, with
``max_active_runs=1``, hold the next round back; a run per candidate also keeps each candidate's
review apart, which a run scheduled on the model Asset would not (Airflow folds the events that
arrive between two scheduler loops into one run).

``approve`` is the standard provider's ``HITLOperator``: it waits in ``awaiting_input`` without a
worker slot, shows the candidate against the champion (the register result the trigger hands over
as the run's conf, and the current champion's records in the store: the Airflow side has no
MLflow), and takes the answer from the UI or the
REST API (``PATCH /api/v2/dags/<dag>/dagRuns/<run>/taskInstances/approve/-1/hitlDetails``). No
answer within ``promotion.approval_timeout`` takes its default, Reject. ``promote`` is a StepCall run
by the job's runner like every step: it moves `champion` or tags the version rejected.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param
from airflow.sdk.exceptions import AirflowSkipException

from airfed.dag.builder import START_DATE, model_asset, task_options
from airfed.dag.model_event import ModelEventOperator
from airfed.dag.step_calls import job_env
from airfed.ui import links
from fl_tasks.contract import TIMEOUT_ENV, StepCall, approval_dag_id, approval_run_id, step_argv
from fl_tasks.spec import JobSpec

APPROVE, REJECT = "Approve", "Reject"
APPROVE_TASK_ID = "approve"
PROMOTE_TASK_ID = "promote"
MODEL_EVENT_TASK_ID = "model_event"
REQUEST_APPROVAL_TASK_ID = "request_approval"
#: The approval run's conf key holding the register result of the candidate's round.
CANDIDATE_KEY = "candidate"


# -- the body a person reads -----------------------------------------------------------------------
def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else "–"


def _metric_rows(candidate: dict, champion: dict | None, metric: str) -> list[str]:
    ours, theirs = candidate.get("metrics") or {}, (champion or {}).get("metrics") or {}
    names = [metric] + sorted((set(ours) | set(theirs)) - {metric})
    return [f"| {'**' + n + '**' if n == metric else n} | {_num(ours.get(n))} | {_num(theirs.get(n))} |"
            for n in names]


def _silo_rows(candidate: dict, champion: dict | None, metric: str) -> list[str]:
    ours, theirs = candidate.get("silo_metrics") or {}, (champion or {}).get("silo_metrics") or {}
    return [f"| {silo} | {_num(ours.get(silo, {}).get(metric))} | {_num(theirs.get(silo, {}).get(metric))} |"
            for silo in sorted(set(ours) | set(theirs))]


def approval_body(candidate: dict[str, Any], direction: str, timeout: timedelta) -> str:
    """Markdown for the approval task: the candidate against the champion it would replace."""
    champion = candidate.get("champion")
    metric = candidate.get("promotion_metric") or "metric"
    model, version = candidate.get("registry_model"), candidate.get("registry_version")
    ui = links.mlflow_ui_url(candidate.get("tracking_uri"))
    ours = f"candidate v{version} (round {candidate.get('round')})"
    theirs = (f"champion v{champion['version']} (round {champion.get('round')})" if champion
              else "champion: none yet")
    lines = [
        f"### {model} v{version}: promote to `champion`?",
        "",
        f"Promotion metric **{metric}** ({direction}). Current champion: "
        + (f"v{champion['version']}." if champion else "none."),
        "",
        f"| metric | {ours} | {theirs} |", "|---|---:|---:|",
        *_metric_rows(candidate, champion, metric),
    ]
    silo_rows = _silo_rows(candidate, champion, metric)
    if silo_rows:
        lines += ["", f"Per silo ({metric}, federated evaluation):", "",
                  "| silo | candidate | champion |", "|---|---:|---:|", *silo_rows]
    rejected = candidate.get("rejected") or {}
    lines += ["", f"Silos accepted this round: {', '.join(candidate.get('accepted') or []) or 'none'}."]
    if rejected:
        lines += ["Rejected: " + "; ".join(f"{s} ({why[:200]})" for s, why in sorted(rejected.items())) + "."]
    run_links = []
    if candidate.get("mlflow_experiment_id") and candidate.get("mlflow_run_id"):
        url = links.run_url(candidate["mlflow_experiment_id"], candidate["mlflow_run_id"], ui)
        run_links.append(f"[candidate's round run]({url})")
    if model and version is not None:
        run_links.append(f"[model version v{version}]({links.model_version_url(model, version, ui)})")
    if champion and champion.get("mlflow_experiment_id") and champion.get("mlflow_run_id"):
        url = links.run_url(champion["mlflow_experiment_id"], champion["mlflow_run_id"], ui)
        run_links.append(f"[champion's round run]({url})")
    if run_links:
        lines += ["", "MLflow: " + " · ".join(run_links)]
    lines += ["", f"**{APPROVE}** moves `champion` to v{version} (tagged with your name and the time). "
              f"**{REJECT}** tags it rejected with your reason; `champion` stays. No answer within "
              f"{timeout} counts as {REJECT}."]
    return "\n".join(lines)


def current_champion(job: str) -> dict[str, Any] | None:
    """The champion now, from the store (``champion.json`` and its round's ``registry.json``, as the
    jobs page reads them): an earlier candidate may have been approved since this one was registered.
    None when the store names none (then the register result's snapshot is shown)."""
    from fl_tasks.store import JobKeys, open_store

    store, keys = open_store(), JobKeys(job)
    holder = store.get_json_or_none(keys.champion)
    if not holder:
        return None
    summary = {"version": holder["version"], "round": holder.get("round")}
    record = store.get_json_or_none(keys.registry(int(holder["round"]))) if holder.get("round") else None
    if record and record.get("registry_version") == holder["version"]:
        keep = ("metrics", "silo_metrics", "accepted", "rejected", "promotion_value", "mlflow_run_id",
                "mlflow_experiment_id")
        summary.update({k: record[k] for k in keep if k in record})
    return summary


class CandidateApprovalOperator(HITLOperator):
    """Approve / Reject one candidate version; the answer is returned as plain JSON for ``promote``:
    ``{"approved", "by", "at", "reason", "timed_out"}``."""

    ui_color = "#fdf3d8"

    def __init__(self, *, direction: str, response_timeout: timedelta, **kwargs: Any) -> None:
        super().__init__(
            options=[APPROVE, REJECT], defaults=[REJECT], multiple=False, response_timeout=response_timeout,
            params={"reason": Param("", type="string", title="Reason",
                                    description="Why (recorded on the model version; needed to reject)")},
            **kwargs,
        )
        self.direction = direction

    def execute(self, context: Any) -> Any:
        candidate = (context["dag_run"].conf or {}).get(CANDIDATE_KEY)
        if not isinstance(candidate, dict) or "round" not in candidate:
            raise ValueError(f"the run's conf has no {CANDIDATE_KEY!r} (the register result of a round): "
                             "approval runs are triggered by the job's request_approval task")
        self.subject = (f"Promote {candidate.get('registry_model')} v{candidate.get('registry_version')} "
                        f"(round {candidate['round']}) to champion?")
        try:
            now = current_champion(str(candidate.get("job")))
        except Exception as exc:  # noqa: BLE001 - the snapshot taken at registration still informs the person
            self.log.warning("could not read the current champion from the store: %s", exc)
            now = None
        if now is not None and now["version"] != candidate.get("registry_version"):
            candidate = {**candidate, "champion": now}
        self.body = approval_body(candidate, self.direction, self.response_timeout or timedelta(0))
        self.params["reason"] = ""  # an empty form (execute_complete writes the last answer into it)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        answer = super().execute_complete(context, event)
        user = answer.get("responded_by_user") or {}
        at = answer.get("responded_at")
        return {
            "approved": answer["chosen_options"] == [APPROVE],
            "by": user.get("name") or user.get("id") or ("timeout" if event.get("timedout") else "unknown"),
            "at": at.isoformat() if hasattr(at, "isoformat") else at,
            # on a timeout Airflow fills the form with its defaults: nobody gave a reason
            "reason": "" if event.get("timedout") else str((answer.get("params_input") or {}).get("reason") or ""),
            "timed_out": bool(event.get("timedout")),
        }


# -- the round's side ------------------------------------------------------------------------------
class RequestApprovalOperator(TriggerDagRunOperator):
    """Trigger the approval run of this round's candidate (skip when register found none)."""

    ui_color = "#fdf3d8"

    def __init__(self, *, register_task_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("skip_when_already_exists", True)
        kwargs.setdefault("openlineage_inject_parent_info", False)
        super().__init__(**kwargs)
        self.register_task_id = register_task_id

    def execute(self, context: Any) -> Any:
        result = context["ti"].xcom_pull(task_ids=self.register_task_id)
        if not isinstance(result, dict) or not result.get("awaiting_approval"):
            raise AirflowSkipException("this round's version does not improve on the champion: nothing to approve")
        self.conf = {CANDIDATE_KEY: result}
        self.trigger_run_id = approval_run_id(int(result["round"]), str(result["dag_run_id"]))
        self.log.info("v%s awaits approval: run %s of %s", result.get("registry_version"), self.trigger_run_id,
                      self.trigger_dag_id)
        return super().execute(context)


def request_approval_task(spec: JobSpec, register_task_id: str) -> RequestApprovalOperator:
    return RequestApprovalOperator(
        task_id=REQUEST_APPROVAL_TASK_ID, trigger_dag_id=approval_dag_id(spec.job), register_task_id=register_task_id,
    )


# -- the approval DAG ------------------------------------------------------------------------------
def promote_call(spec: JobSpec) -> StepCall:
    """``python -m fl_tasks promote --job J --round R --run-id ID --decision JSON`` (templated per run)."""
    argv = step_argv("promote", job=spec.job, round_ref="{{ dag_run.conf['" + CANDIDATE_KEY + "']['round'] }}",
                     run_id="{{ run_id }}")
    argv += ["--decision", "{{ ti.xcom_pull(task_ids='" + APPROVE_TASK_ID + "') | tojson }}"]
    env = {**job_env(spec), TIMEOUT_ENV: str(spec.execution.server_timeout_seconds)}
    return StepCall("promote", argv, env, None, spec.placement)


def build_approval_dag(spec: JobSpec) -> DAG:
    """``<job>__approval``: one run per candidate version (triggered by the round's request_approval)."""
    from airfed.runners import operator_factory

    timeout = timedelta(seconds=spec.promotion.approval_timeout)
    with DAG(
        dag_id=approval_dag_id(spec.job),
        description=f"Approve or reject candidate versions of airfed job {spec.job}",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        is_paused_upon_creation=False,
        tags=["airfed", "approval", *spec.tags],
        doc_md=(f"### Approvals of airfed job `{spec.job}`\n\nOne run per candidate version of "
                f"`{spec.model_name}`, triggered by the job's `{REQUEST_APPROVAL_TASK_ID}` task. Approve moves "
                f"`champion`; Reject (or no answer within {timeout}) tags the version rejected."),
        default_args={"owner": "airfed"},
    ) as dag:
        approve = CandidateApprovalOperator(
            task_id=APPROVE_TASK_ID, subject=f"Promote a candidate of {spec.job} to champion?",
            direction=spec.promotion.direction, response_timeout=timeout,
        )
        promote = operator_factory(spec)("promote", promote_call(spec), task_options(spec, "promote"))
        event = ModelEventOperator(task_id=MODEL_EVENT_TASK_ID, asset=model_asset(spec), source_task_id=PROMOTE_TASK_ID,
                                   only_when_moved=True)
        approve >> promote >> event
    return dag
