"""distribute: fix the round number and publish the global model this round trains from.

The round is HEAD's round + 1. A retry within the same DAG run (one DAG run is one round) finds
its own plan and reuses it, so re-running is idempotent. Round 1's global comes from the spec's
model factory or seed file; later rounds train from the global that the previous round's aggregate
committed.

The plan is *claimed* (:func:`fl_tasks.commit.claim_plan`: created only if the round has none), so
a second run on the job learns that the round is taken before anything trains. It then stops
(default), or with ``AIRFED_CLAIM_WAIT_SECONDS`` set waits that long for the other run to commit
the round and plans the next one from the new HEAD. Round 1's initial global is uploaded only once
the claim is won, so a losing run writes nothing.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import cast

from fl_tasks import commit, regions
from fl_tasks.contract import SPEC_ENV
from fl_tasks.paths import expand_path
from fl_tasks.records import Head, ObjectRef, Plan, PlanSilo, RegistryNames, Sampling
from fl_tasks.spec import JobSpec, ceil_fraction
from fl_tasks.steps.common import StepEnv, log, now, scratch_dir, write_result
from fl_tasks.store import ChecksumMismatch, ObjectMissing, sha256_file


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
    size = min(len(names), max(ceil_fraction(fraction, len(names)), at_least, 1))
    rng = random.Random(f"{seed}:{job}:{r}")
    return sorted(rng.sample(names, size), key=names.index)


def _initial_global(env: StepEnv, spec: JobSpec, r: int, tmp: Path) -> Path:
    """The initial global model as a local file (uploaded once the round's claim is won)."""
    model = spec.model
    if model.seed:
        seed = expand_path(model.seed)
        log(f"round {r}: initial global model from seed file {seed}")
        return Path(seed)
    # torch and the user's model code are needed only here, for round 1
    from fl_tasks.bridge import load_object
    from fl_tasks.weights import save_state_dict

    path = tmp / "global.safetensors"
    factory = load_object(cast(str, model.init))  # the spec gives exactly one of seed/init
    state = factory()
    log(f"round {r}: initial global model from {model.init} ({len(state)} tensors)")
    save_state_dict(state, path, metadata={"job": env.args.job, "round": str(r)})
    return path


def _publish_initial(env: StepEnv, spec: JobSpec, plan: Plan, path: Path | None = None) -> None:
    """Make sure a round-1 plan's initial global is in the store with the plan's sha256 (uploaded
    after the claim, so a retry after a crash in between uploads it; a model factory that does not
    reproduce its bytes gets the plan's reference replaced, the round being this run's own)."""
    ref = plan.input_global
    if plan.previous_head is not None:
        return
    with scratch_dir() as tmp:
        try:
            env.store.get_file(ref.key, tmp / "check.safetensors", ref.sha256)
            return
        except (ObjectMissing, ChecksumMismatch):
            pass
        path = path or _initial_global(env, spec, plan.round, tmp)
        sha = env.store.put_file(ref.key, path)
        if sha != ref.sha256:
            _, version = env.store.get_versioned(env.keys.plan(plan.round))
            fixed = plan.model_copy(update={"input_global": ObjectRef(key=ref.key, sha256=sha)})
            env.store.replace_record_if(env.keys.plan(plan.round), fixed, version)


def run(env: StepEnv) -> None:
    spec = _spec()
    env.store.prepare()
    wait = commit.claim_wait_seconds()
    deadline = now() + wait
    commit.roll_forward(env.store, env.keys, log)
    while True:
        try:
            return _plan_round(env, spec)
        except commit.RoundClaimed as conflict:
            try:
                if wait <= 0:
                    raise
                commit.wait_for_commit(env.store, env.keys, conflict, max(0.0, deadline - now()), log)
            except commit.RoundClaimed as final:
                commit.record_lost(env.store, env.keys, final)
                raise


def _plan_round(env: StepEnv, spec: JobSpec) -> None:
    head = env.store.get_record_or_none(env.keys.head, Head)
    r = _choose_round(env, head)
    existing = env.store.get_record_or_none(env.keys.plan(r), Plan)
    if existing and existing.dag_run_id == env.args.run_id:
        log(f"round {r} already planned by this run; reusing its plan")
        _publish_initial(env, spec, existing)
        existing = env.plan_of(r)
        write_result({"round": r, "input_global": existing.input_global.model_dump(), "reused": True})
        return

    with scratch_dir() as tmp:
        _claim(env, spec, head, r, tmp)


def _claim(env: StepEnv, spec: JobSpec, head: Head | None, r: int, tmp: Path) -> None:
    initial = None
    if head:
        global_ref = head.global_ref
        if not env.store.exists(global_ref.key):
            raise RuntimeError(f"HEAD points at {env.store.describe(global_ref.key)}, which does not exist")
        log(f"round {r}: training from the global model committed by round {head.round}")
    else:
        initial = _initial_global(env, spec, r, tmp)
        global_ref = ObjectRef(key=env.keys.global_model(r), sha256=sha256_file(initial))

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
        **regions.plan_fields(spec),  # the regional tier (flat jobs: nothing)
    )
    owned = commit.claim_plan(env.store, env.keys, plan, log)
    _publish_initial(env, spec, owned, initial if owned is plan else None)
    if owned is not plan:
        log(f"round {r} already planned by this run; reusing its plan")
        owned = env.plan_of(r)
    else:
        log(f"round {r}: planned; training on {', '.join(sampled)} of {len(names)} silos; config {training}")
    write_result({"round": r, "input_global": owned.input_global.model_dump(), "reused": owned is not plan})
