"""train: one silo trains the round's global model with the user's Flower ClientApp.

Writes ``updates/<silo>.safetensors`` and its manifest (num_examples, metrics, sha256). A retry
whose update is already stored with a valid manifest does not train again.
"""

from __future__ import annotations

import time

from fl_tasks.bridge import call_client_app, load_client_app, silo_node_id
from fl_tasks.privacy import clip_state
from fl_tasks.steps.common import StepEnv, log, scratch_dir, write_result
from fl_tasks.weights import load_state_dict, save_state_dict


def record_failure(env: StepEnv, exc: BaseException) -> None:
    """Record why this silo has no update (the aggregator reports it in result.json and MLflow)."""
    state = "timed_out" if isinstance(exc, TimeoutError) else "failed"
    reason = f"{type(exc).__name__}: {exc}" if state == "failed" else str(exc)
    env.store.put_json(
        env.keys.status(env.round, env.args.silo),
        {"silo": env.args.silo, "round": env.round, "dag_run_id": env.args.run_id, "state": state, "reason": reason},
    )


def run(env: StepEnv) -> None:
    plan = env.plan()
    env.require_sampled(plan)
    silo = env.silo_entry(plan)
    r, name = env.round, silo["name"]
    manifest_key, update_key = env.keys.manifest(r, name), env.keys.update(r, name)
    existing = env.store.get_json_or_none(manifest_key)
    if existing and existing.get("dag_run_id") == plan["dag_run_id"] and env.store.exists(update_key):
        log(f"round {r}: silo {name} already stored its update; not training again")
        write_result({"round": r, "silo": name, "sha256": existing["sha256"], "reused": True})
        return

    app = load_client_app(plan["client_app"])
    config = {**plan["training"], "server-round": r}
    with scratch_dir() as tmp:
        global_path = env.fetch(plan["input_global"]["key"], plan["input_global"]["sha256"], tmp)
        state = load_state_dict(global_path)
        log(f"round {r}: silo {name} training from {plan['input_global']['sha256'][:12]} with {plan['client_app']}")
        started = time.time()
        reply = call_client_app(
            app, "train", state, config, silo=silo, round_number=r, node_id=silo_node_id(name)
        )
        seconds = time.time() - started
        arrays = reply.arrays
        dp = plan.get("differential_privacy")
        if dp and dp["mode"] == "client":
            arrays, norm = clip_state(arrays, state, dp["clipping_norm"])
            log(f"round {r}: silo {name} clipped its update (norm {norm:.4g}) to {dp['clipping_norm']}")
        update_path = tmp / "update.safetensors"
        save_state_dict(arrays, update_path, metadata={"job": env.args.job, "round": str(r), "silo": name})
        sha = env.store.put_file(update_key, update_path)
    manifest = {
        "job": env.args.job,
        "round": r,
        "silo": name,
        "dag_run_id": plan["dag_run_id"],
        "key": update_key,
        "sha256": sha,
        "num_examples": reply.num_examples,
        "metrics": reply.metrics,
        "global_sha256": plan["input_global"]["sha256"],
        "seconds": round(seconds, 3),
    }
    env.store.put_json(manifest_key, manifest)
    log(f"round {r}: silo {name} trained on {reply.num_examples} examples in {seconds:.1f}s: {reply.metrics}")
    write_result({"round": r, "silo": name, "sha256": sha, "metrics": reply.metrics, "reused": False})
