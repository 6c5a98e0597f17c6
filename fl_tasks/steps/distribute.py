"""distribute: fix the round number and publish the global model this round trains from.

The round is HEAD's round + 1. A retry within the same DAG run (one DAG run is one round) finds
its own plan and reuses it, so re-running is idempotent. Round 1's global comes from the spec's
model factory or seed file; later rounds train from the global that the previous round's aggregate
committed.
"""

from __future__ import annotations

import math
import os
import random

from fl_tasks.contract import SPEC_ENV
from fl_tasks.paths import expand_path
from fl_tasks.records import Head, ObjectRef, Plan, PlanSilo, RegistryNames, Sampling
from fl_tasks.spec import JobSpec
from fl_tasks.steps.common import StepEnv, log, now, scratch_dir, write_result


def _spec() -> JobSpec:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        raise RuntimeError(f"{SPEC_ENV} is not set: the distribute step needs the job spec (as JSON)")
    return JobSpec.from_step_payload(raw)


def _choose_round(env: StepEnv, head: Head | None) -> int:
    """HEAD+1, unless this DAG run already planned a round (a retry or a re-run)."""
    head_round = head.round if head else 0
    for candidate in (head_round + 1, head_round):
        if candidate < 1:
            continue
        plan = env.store.get_record_or_none(env.keys.plan(candidate), Plan)
        if plan and plan.dag_run_id == env.args.run_id:
            return candidate
    return head_round + 1


def sample_silos(names: list[str], fraction: float, seed: int, job: str, r: int, at_least: int) -> list[str]:
    """Flower-style client sampling: ceil(fraction × N) silos (at least the quorum), seeded per round."""
    if fraction >= 1.0:
        return list(names)
    size = min(len(names), max(math.ceil(fraction * len(names)), at_least, 1))
    rng = random.Random(f"{seed}:{job}:{r}")
    return sorted(rng.sample(names, size), key=names.index)


def _initial_global(env: StepEnv, spec: JobSpec, r: int) -> ObjectRef:
    key = env.keys.global_model(r)
    model = spec.model
    with scratch_dir() as tmp:
        path = tmp / "global.safetensors"
        if model.seed:
            seed = expand_path(model.seed)
            log(f"round {r}: initial global model from seed file {seed}")
            sha = env.store.put_file(key, seed)
        else:
            # torch and the user's model code are needed only here, for round 1
            from fl_tasks.bridge import load_object
            from fl_tasks.weights import save_state_dict

            factory = load_object(model.init)
            state = factory()
            log(f"round {r}: initial global model from {model.init} ({len(state)} tensors)")
            save_state_dict(state, path, metadata={"job": env.args.job, "round": str(r)})
            sha = env.store.put_file(key, path)
    return ObjectRef(key=key, sha256=sha)


def run(env: StepEnv) -> None:
    spec = _spec()
    env.store.prepare()
    head = env.store.get_record_or_none(env.keys.head, Head)
    r = _choose_round(env, head)
    existing = env.store.get_record_or_none(env.keys.plan(r), Plan)
    if existing and existing.dag_run_id == env.args.run_id:
        log(f"round {r} already planned by this run; reusing its plan")
        write_result({"round": r, "input_global": existing.input_global.model_dump(), "reused": True})
        return

    if head:
        global_ref = head.global_ref
        if not env.store.exists(global_ref.key):
            raise RuntimeError(f"HEAD points at {env.store.describe(global_ref.key)}, which does not exist")
        log(f"round {r}: training from the global model committed by round {head.round}")
    else:
        global_ref = _initial_global(env, spec, r)

    # the strategy's client-side parameters (FedProx's proximal_mu) unless the training config sets them
    training = {**spec.strategy.client_config(), **spec.training, **(env.args.training or {})}
    names = [s.name for s in spec.silos]
    strategy = spec.strategy
    sampled = sample_silos(names, strategy.fraction_train, strategy.sample_seed, env.args.job, r,
                           spec.quorum.min_silos)
    plan = Plan(
        job=env.args.job,
        round=r,
        dag_run_id=env.args.run_id,
        chain_id=env.args.chain_id or env.args.run_id,
        created_at=now(),
        spec_hash=spec.spec_hash(),
        client_app=spec.client_app,
        strategy=strategy.resolved(),
        quorum=spec.quorum,
        guards=spec.guards,
        differential_privacy=spec.differential_privacy,
        promotion=spec.promotion,
        registry=RegistryNames(model_name=spec.model_name, experiment=spec.experiment_name),
        training=training,
        silos=[PlanSilo(name=s.name, data=s.data, node_config=s.node_config) for s in spec.silos],
        sampled=sampled,
        sampling=Sampling(fraction_train=strategy.fraction_train, seed=strategy.sample_seed),
        input_global=global_ref,
        previous_head=head,
    )
    env.store.put_record(env.keys.plan(r), plan)
    log(f"round {r}: planned; training on {', '.join(sampled)} of {len(names)} silos; config {training}")
    write_result({"round": r, "input_global": global_ref.model_dump(), "reused": False})
