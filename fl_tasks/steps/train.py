"""train: one silo trains the round's global model with the user's Flower ClientApp.

Writes ``updates/<silo>.safetensors`` and its manifest (num_examples, metrics, sha256). A retry
whose update is already stored with a valid manifest does not train again.
"""

from __future__ import annotations

import time

from fl_tasks.bridge import ClientAppError, run_client_app
from fl_tasks.privacy import clip_state
from fl_tasks.records import Manifest, TrainStatus
from fl_tasks.steps.common import StepEnv, log, scratch_dir, write_result
from fl_tasks.weights import load_state_dict, save_state_dict


def record_failure(env: StepEnv, exc: BaseException) -> None:
    """Record why this silo has no update (the aggregator reports it in result.json and MLflow)."""
    timed_out = isinstance(exc, TimeoutError)
    status = TrainStatus(
        silo=env.args.silo or "",
        round=env.round,
        dag_run_id=env.args.run_id,
        state="timed_out" if timed_out else "failed",
        reason=str(exc) if timed_out or isinstance(exc, ClientAppError) else f"{type(exc).__name__}: {exc}",
    )
    env.store.put_record(env.keys.status(env.round, status.silo), status)


def run(env: StepEnv) -> None:
    plan = env.plan()
    env.require_sampled(plan)
    silo = env.silo_entry(plan)
    r, name = env.round, silo.name
    manifest_key, update_key = env.keys.manifest(r, name), env.keys.update(r, name)
    existing = env.store.get_record_or_none(manifest_key, Manifest)
    if existing and existing.dag_run_id == plan.dag_run_id and env.store.exists(update_key):
        log(f"round {r}: silo {name} already stored its update; not training again")
        write_result({"round": r, "silo": name, "sha256": existing.sha256, "reused": True})
        return

    with scratch_dir() as tmp:
        global_path = env.fetch(plan.input_global, tmp)
        state = load_state_dict(global_path)
        log(f"round {r}: silo {name} training from {plan.input_global.sha256[:12]} with {plan.client_app}")
        started = time.time()
        reply = run_client_app(plan, silo, "train", state)
        seconds = time.time() - started
        arrays = reply.arrays
        assert arrays is not None  # call_client_app refuses a train reply without an ArrayRecord
        dp = plan.differential_privacy
        if dp and dp.mode == "client":
            arrays, norm = clip_state(arrays, state, dp.clipping_norm)
            log(f"round {r}: silo {name} clipped its update (norm {norm:.4g}) to {dp.clipping_norm}")
        update_path = tmp / "update.safetensors"
        save_state_dict(arrays, update_path, metadata={"job": env.args.job, "round": str(r), "silo": name})
        sha = env.store.put_file(update_key, update_path)
    manifest = Manifest(
        job=env.args.job,
        round=r,
        silo=name,
        dag_run_id=plan.dag_run_id,
        key=update_key,
        sha256=sha,
        num_examples=reply.num_examples,
        metrics=reply.metrics,
        global_sha256=plan.input_global.sha256,
        seconds=round(seconds, 3),
    )
    env.store.put_record(manifest_key, manifest)
    log(f"round {r}: silo {name} trained on {reply.num_examples} examples in {seconds:.1f}s: {reply.metrics}")
    write_result({"round": r, "silo": name, "sha256": sha, "metrics": reply.metrics, "reused": False})
