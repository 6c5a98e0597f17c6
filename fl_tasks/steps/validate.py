"""validate: the silo checks its own update before it is offered to the aggregator.

Guards (checksum, keys/shapes/dtypes, finite values, example count, optional norm bound), then a
local evaluation of the update with the ClientApp's evaluate handler on the silo's validation data.
The verdict goes to ``validation/<silo>.json``; the aggregator re-runs the guards regardless.
"""

from __future__ import annotations

from fl_tasks.bridge import run_client_app
from fl_tasks.guards import check_with_spec_guards
from fl_tasks.records import Manifest, Plan, PlanSilo, Verdict
from fl_tasks.steps.common import StepEnv, current_manifest, log, missing_update_reason, scratch_dir, write_result
from fl_tasks.store import ChecksumMismatch
from fl_tasks.weights import load_state_dict


def run(env: StepEnv) -> None:
    plan = env.plan()
    env.require_sampled(plan)
    silo = env.silo_entry(plan)
    r, name = env.round, silo.name
    manifest = current_manifest(env, plan, name)
    head = {"job": env.args.job, "round": r, "silo": name, "dag_run_id": plan.dag_run_id}
    if manifest is None:
        verdict = Verdict(**head, accepted=False, reason=missing_update_reason(env, r, name))
    else:
        verdict = _check(env, plan, silo, manifest, head)
    env.store.put_record(env.keys.verdict(r, name), verdict)
    state = "accepted" if verdict.accepted else f"REJECTED ({verdict.reason})"
    log(f"round {r}: silo {name} update {state}; local metrics {verdict.metrics}")
    write_result(verdict.model_dump(include={"round", "silo", "accepted", "reason", "metrics"}))


def _check(env: StepEnv, plan: Plan, silo: PlanSilo, manifest: Manifest, head: dict) -> Verdict:
    with scratch_dir() as tmp:
        global_path = env.fetch(plan.input_global, tmp)
        try:
            update_path = env.fetch(manifest.ref, tmp)
        except ChecksumMismatch as exc:
            return Verdict(**head, update_sha256=manifest.sha256, accepted=False, reason=str(exc))
        guard = check_with_spec_guards(update_path, global_path, manifest.num_examples, plan.guards)
        if not guard.accepted:
            return Verdict(**head, update_sha256=manifest.sha256, update_norm=guard.update_norm, accepted=False,
                           reason=guard.reason)
        reply = run_client_app(plan, silo, "evaluate", load_state_dict(update_path))
    return Verdict(**head, update_sha256=manifest.sha256, update_norm=guard.update_norm, accepted=True,
                   metrics=reply.metrics)
