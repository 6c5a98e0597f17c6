"""distribute: fix the round number and publish the global model this round trains from.

The round is HEAD's round + 1. A retry within the same DAG run (one DAG run is one round) finds
its own plan and reuses it, so re-running is idempotent. Round 1's global comes from the spec's
model factory or seed file; later rounds train from the global that the previous round's aggregate
committed.
"""

from __future__ import annotations

import json
import math
import os
import random

from fl_tasks.contract import SPEC_ENV
from fl_tasks.paths import expand_path
from fl_tasks.steps.common import StepEnv, log, now, scratch_dir, write_result


def _spec() -> dict:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        raise RuntimeError(f"{SPEC_ENV} is not set: the distribute step needs the job spec (as JSON)")
    return json.loads(raw)


def _choose_round(env: StepEnv, head: dict | None) -> int:
    """HEAD+1, unless this DAG run already planned a round (a retry or a re-run)."""
    head_round = head["round"] if head else 0
    for candidate in (head_round + 1, head_round):
        if candidate < 1:
            continue
        plan = env.store.get_json_or_none(env.keys.plan(candidate))
        if plan and plan.get("dag_run_id") == env.args.run_id:
            return candidate
    return head_round + 1


def sample_silos(names: list[str], fraction: float, seed: int, job: str, r: int, at_least: int) -> list[str]:
    """Flower-style client sampling: ceil(fraction × N) silos (at least the quorum), seeded per round."""
    if fraction >= 1.0:
        return list(names)
    size = min(len(names), max(math.ceil(fraction * len(names)), at_least, 1))
    rng = random.Random(f"{seed}:{job}:{r}")
    return sorted(rng.sample(names, size), key=names.index)


def _initial_global(env: StepEnv, spec: dict, r: int) -> dict:
    key = env.keys.global_model(r)
    model = spec["model"]
    with scratch_dir() as tmp:
        path = tmp / "global.safetensors"
        if model.get("seed"):
            seed = expand_path(model["seed"])
            log(f"round {r}: initial global model from seed file {seed}")
            sha = env.store.put_file(key, seed)
        else:
            # torch and the user's model code are needed only here, for round 1
            from fl_tasks.bridge import load_object
            from fl_tasks.weights import save_state_dict

            factory = load_object(model["init"])
            state = factory()
            log(f"round {r}: initial global model from {model['init']} ({len(state)} tensors)")
            save_state_dict(state, path, metadata={"job": env.args.job, "round": str(r)})
            sha = env.store.put_file(key, path)
    return {"key": key, "sha256": sha}


def run(env: StepEnv) -> None:
    spec = _spec()
    env.store.prepare()
    head = env.store.get_json_or_none(env.keys.head)
    r = _choose_round(env, head)
    existing = env.store.get_json_or_none(env.keys.plan(r))
    if existing and existing.get("dag_run_id") == env.args.run_id:
        log(f"round {r} already planned by this run; reusing its plan")
        write_result({"round": r, "input_global": existing["input_global"], "reused": True})
        return

    if head:
        global_ref = {"key": head["global_key"], "sha256": head["global_sha256"]}
        if not env.store.exists(global_ref["key"]):
            raise RuntimeError(f"HEAD points at {env.store.describe(global_ref['key'])}, which does not exist")
        log(f"round {r}: training from the global model committed by round {head['round']}")
    else:
        global_ref = _initial_global(env, spec, r)

    training = {**spec.get("training", {}), **(env.args.training or {})}
    names = [s["name"] for s in spec["silos"]]
    quorum = spec.get("quorum", {})
    strategy_spec = spec.get("strategy", {})
    fraction = float(strategy_spec.get("fraction_train", 1.0))
    seed = int(strategy_spec.get("sample_seed", 0))
    sampled = sample_silos(names, fraction, seed, env.args.job, r, int(quorum.get("min_silos", 1)))
    strategy = spec.get("strategy", {"name": "FedAvg", "params": {}})
    if strategy["name"] == "FedProx":
        training.setdefault("proximal_mu", strategy.get("params", {}).get("proximal_mu", 0.0))
    plan = {
        "job": env.args.job,
        "round": r,
        "dag_run_id": env.args.run_id,
        "chain_id": env.args.chain_id or env.args.run_id,
        "created_at": now(),
        "spec_hash": spec["_hash"],
        "client_app": spec["client_app"],
        "strategy": strategy,
        "quorum": spec.get("quorum", {}),
        "guards": spec.get("guards", {}),
        "differential_privacy": spec.get("differential_privacy"),
        "promotion": spec.get("promotion", {}),
        "registry": {"model_name": spec["_model_name"], "experiment": spec["_experiment"]},
        "training": training,
        "silos": [
            {"name": s["name"], "data": s["data"], "node_config": s.get("node_config", {})} for s in spec["silos"]
        ],
        "sampled": sampled,
        "sampling": {"fraction_train": fraction, "seed": seed},
        "input_global": global_ref,
        "previous_head": head,
    }
    env.store.put_json(env.keys.plan(r), plan)
    log(f"round {r}: planned; training on {', '.join(sampled)} of {len(names)} silos; config {training}")
    write_result({"round": r, "input_global": global_ref, "reused": False})
