"""promote: apply a person's answer to a round's candidate version (the job's approval DAG).

Runs after the approval task of ``<job>__approval`` with its answer as ``--decision`` (JSON:
``approved``, ``by``, ``reason``, ``timed_out``). Approve moves `champion` to the candidate
(checked and recorded by :mod:`fl_tasks.promotion`); reject, or no answer in time, tags it rejected
and leaves `champion` where it is. The result (the task's XCom) says whether the champion moved:
the approval DAG publishes it on the job's model Asset.
"""

from __future__ import annotations

from fl_tasks import lineage, promotion
from fl_tasks.records import ApprovalRecord, Result
from fl_tasks.steps.common import StepEnv, log, scratch_dir, write_result


def run(env: StepEnv) -> None:
    decision = env.args.decision
    if not isinstance(decision, dict) or not isinstance(decision.get("approved"), bool):
        raise SystemExit(f"promote needs --decision with a boolean 'approved', got {decision!r}")
    r = env.round
    plan = env.plan()
    record = env.store.get_record_or_none(env.keys.approval(r), ApprovalRecord)
    if record is None:
        raise RuntimeError(f"round {r} of {env.args.job} has no candidate awaiting approval "
                           f"({env.store.describe(env.keys.approval(r))} is missing)")
    by = str(decision.get("by") or "unknown")
    timed_out = bool(decision.get("timed_out"))
    reason = str(decision.get("reason") or "")
    if timed_out and not reason:
        reason = "no answer within promotion.approval_timeout"
    model_name = plan.registry.model_name
    with lineage.reporting_failures(f"applying the answer to round {r}'s candidate"), scratch_dir() as tmp:
        c = lineage.client()
        if record.state != "pending":  # a retry after the answer was applied: report it again
            done, moved = record, False
            log(f"round {r}: v{record.version} was already {record.state} by {record.by}")
        else:
            done, move = promotion.answer(
                c, env.store, record, approved=decision["approved"], by=by, reason=reason, timed_out=timed_out,
                model_name=model_name, experiment=plan.registry.experiment, scratch=tmp,
            )
            moved = move is not None
            log(move.describe(model_name) if move else f"round {r}: v{record.version} rejected by {by}: {reason}")
        champion = lineage.champion(c, model_name)
    result = env.store.get_record_or_none(env.keys.result(r), Result)
    write_result({
        "job": env.args.job, "round": r, "registry_model": model_name, "registry_version": done.version,
        "state": done.state, "by": done.by, "reason": done.reason, "timed_out": done.timed_out,
        "champion_moved": moved, "champion_version": int(champion.version) if champion else None,
        "dag_run_id": record.dag_run_id,
        "global": result.new_global.model_dump() if result and result.new_global else None,
    })
