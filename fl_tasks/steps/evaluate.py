"""evaluate: federated evaluation of the round's new global model on one silo's validation data."""

from __future__ import annotations

from fl_tasks.bridge import call_client_app, load_client_app, silo_node_id
from fl_tasks.steps.common import StepEnv, log, scratch_dir, write_result
from fl_tasks.weights import load_state_dict


def run(env: StepEnv) -> None:
    plan = env.plan()
    silo = env.silo_entry(plan)
    r, name = env.round, silo["name"]
    result = env.store.get_json(env.keys.result(r))
    new_global = result["new_global"]
    with scratch_dir() as tmp:
        path = env.fetch(new_global["key"], new_global["sha256"], tmp)
        reply = call_client_app(
            load_client_app(plan["client_app"]),
            "evaluate",
            load_state_dict(path),
            {**plan["training"], "server-round": r},
            silo=silo,
            round_number=r,
            node_id=silo_node_id(name),
        )
    record = {
        "job": env.args.job,
        "round": r,
        "silo": name,
        "global_sha256": new_global["sha256"],
        "num_examples": reply.num_examples,
        "metrics": reply.metrics,
    }
    env.store.put_json(env.keys.evaluation(r, name), record)
    log(f"round {r}: silo {name} evaluated global {new_global['sha256'][:12]}: {reply.metrics}")
    write_result({"round": r, "silo": name, "metrics": reply.metrics})
