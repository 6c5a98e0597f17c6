"""validate: the silo checks its own update before it is offered to the aggregator.

Guards (checksum, keys/shapes/dtypes, finite values, example count, optional norm bound), then a
local evaluation of the update with the ClientApp's evaluate handler on the silo's validation data.
The verdict goes to ``validation/<silo>.json``; the aggregator re-runs the guards regardless.
"""

from __future__ import annotations

from fl_tasks.bridge import call_client_app, load_client_app, silo_node_id
from fl_tasks.guards import check_with_spec_guards
from fl_tasks.steps.common import StepEnv, log, missing_update_reason, scratch_dir, write_result
from fl_tasks.store import ChecksumMismatch
from fl_tasks.weights import load_state_dict


def run(env: StepEnv) -> None:
    plan = env.plan()
    env.require_sampled(plan)
    silo = env.silo_entry(plan)
    r, name = env.round, silo["name"]
    manifest = env.store.get_json_or_none(env.keys.manifest(r, name))
    if manifest is not None and manifest.get("dag_run_id") != plan["dag_run_id"]:
        manifest = None  # left over from an earlier, uncommitted attempt at this round
    verdict: dict = {"job": env.args.job, "round": r, "silo": name, "dag_run_id": plan["dag_run_id"], "metrics": {}}
    if manifest is None:
        verdict.update(accepted=False, reason=missing_update_reason(env, r, name))
    else:
        verdict["update_sha256"] = manifest["sha256"]
        with scratch_dir() as tmp:
            global_path = env.fetch(plan["input_global"]["key"], plan["input_global"]["sha256"], tmp)
            try:
                update_path = env.fetch(manifest["key"], manifest["sha256"], tmp)
            except ChecksumMismatch as exc:
                update_path, reason = None, str(exc)
            if update_path is not None:
                guard = check_with_spec_guards(
                    update_path, global_path, manifest.get("num_examples"), plan.get("guards", {})
                )
                reason = guard.reason
                verdict["update_norm"] = guard.update_norm
            if update_path is not None and guard.accepted:
                reply = call_client_app(
                    load_client_app(plan["client_app"]),
                    "evaluate",
                    load_state_dict(update_path),
                    {**plan["training"], "server-round": r},
                    silo=silo,
                    round_number=r,
                    node_id=silo_node_id(name),
                )
                verdict.update(accepted=True, reason="", metrics=reply.metrics)
            else:
                verdict.update(accepted=False, reason=reason)
    env.store.put_json(env.keys.verdict(r, name), verdict)
    state = "accepted" if verdict["accepted"] else f"REJECTED ({verdict['reason']})"
    log(f"round {r}: silo {name} update {state}; local metrics {verdict['metrics']}")
    write_result({k: verdict[k] for k in ("round", "silo", "accepted", "reason", "metrics")})
