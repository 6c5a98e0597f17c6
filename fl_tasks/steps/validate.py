"""validate: the silo checks its own update before it is offered to the aggregator.

Guards (checksum, keys/shapes/dtypes, finite values, example count, optional norm bound), then a
local evaluation of the update with the ClientApp's evaluate handler on the silo's validation data.
The verdict goes to ``validation/<silo>.json``; the aggregator re-runs the guards regardless.
"""

from __future__ import annotations

from fl_tasks.bridge import call_client_app, load_client_app, silo_node_id
from fl_tasks.guards import check_update
from fl_tasks.steps.common import StepEnv, log, scratch_dir, write_result
from fl_tasks.store import ChecksumMismatch
from fl_tasks.weights import load_state_dict


def run(env: StepEnv) -> None:
    plan = env.plan()
    silo = env.silo_entry(plan)
    r, name = env.round, silo["name"]
    manifest = env.store.get_json_or_none(env.keys.manifest(r, name))
    verdict: dict = {"job": env.args.job, "round": r, "silo": name, "metrics": {}}
    if manifest is None:
        verdict.update(accepted=False, reason="no update was stored (train did not finish)")
    else:
        verdict["update_sha256"] = manifest["sha256"]
        with scratch_dir() as tmp:
            global_path = env.fetch(plan["input_global"]["key"], plan["input_global"]["sha256"], tmp)
            try:
                update_path = env.fetch(manifest["key"], manifest["sha256"], tmp)
            except ChecksumMismatch as exc:
                update_path, reason = None, str(exc)
            if update_path is not None:
                guard = check_update(
                    update_path,
                    global_path,
                    num_examples=manifest.get("num_examples"),
                    max_update_norm=plan.get("guards", {}).get("max_update_norm"),
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
