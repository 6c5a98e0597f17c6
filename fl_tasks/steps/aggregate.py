"""aggregate: server-side guards, quorum, the strategy, then the commit (HEAD.json written last).

The new global is written as the next round's ``global.safetensors`` (the model that round trains
from), then ``result.json`` is *created* (the commit point: one run per round number), then HEAD is
moved from round r-1's version to round r (:func:`fl_tasks.commit.commit_round`). Before anything
is computed the round must be this run's (its plan) and its input global must be HEAD's global;
otherwise the step refuses, names the run that holds the round, and writes ``lost/<run>.json``. A
crash before HEAD leaves the previous model as HEAD; a retry finishes the commit it finds, or
recomputes the same keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl_tasks import commit
from fl_tasks.aggregation import aggregate_files
from fl_tasks.faults import crash_point
from fl_tasks.guards import check_with_spec_guards
from fl_tasks.privacy import add_gaussian_noise, clip_file, noise_stddev
from fl_tasks.records import AcceptedUpdate, Head, ObjectRef, Plan, Result, Verdict
from fl_tasks.spec import Quorum
from fl_tasks.steps.common import StepEnv, current_manifest, log, missing_update_reason, now, scratch_dir, write_result
from fl_tasks.store import ChecksumMismatch


class QuorumNotMet(RuntimeError):
    pass


def required_silos(quorum: Quorum, n_silos: int) -> int:
    """Fewest accepted updates a round of ``n_silos`` sampled silos may commit with."""
    return quorum.required(n_silos)


def run(env: StepEnv) -> None:
    plan = env.plan()
    r = env.round
    done = env.store.get_record_or_none(env.keys.result(r), Result)
    if done is not None and done.committed and done.dag_run_id == env.args.run_id:
        head = commit.roll_forward(env.store, env.keys, log)  # finishes the commit if HEAD was not moved
        log(f"round {r} is already committed by this run (HEAD is round {head.round if head else 0}); nothing to do")
        write_result({**_summary(done), "reused": True})
        return
    head, head_version = commit.head_versioned(env.store, env.keys)
    try:
        commit.check_input(plan, head, env.args.run_id)
    except commit.RoundConflict as conflict:
        commit.record_lost(env.store, env.keys, conflict)
        raise
    if plan.regions is not None:  # the regional tier: combine the regions' partials instead
        from fl_tasks.steps import aggregate_regions

        aggregate_regions.run(env, plan, head, head_version)
        return

    accepted: dict[str, AcceptedUpdate] = {}
    rejected: dict[str, str] = {}
    sampled = plan.sampled_silos
    with scratch_dir() as tmp:
        global_path = env.fetch(plan.input_global, tmp)
        inputs: list[tuple[Path, float]] = []
        for name in sampled:
            update = _checked_update(env, plan, name, global_path, tmp)
            if isinstance(update, str):
                rejected[name] = update
                continue
            path, record = update
            accepted[name] = record
            inputs.append((path, record.num_examples))
        for name, reason in rejected.items():
            log(f"round {r}: silo {name} rejected: {reason}")

        need = required_silos(plan.quorum, len(sampled))
        if len(accepted) < need:
            message = (
                f"round {r}: only {len(accepted)} accepted update(s) ({', '.join(accepted) or 'none'}), "
                f"quorum needs {need}; HEAD stays at round {head.round if head else 0}"
            )
            commit.record_uncommitted(env.store, env.keys, Result(
                job=env.args.job, round=r, dag_run_id=plan.dag_run_id, committed=False, reason=message,
                accepted=accepted, rejected=rejected, input_global=plan.input_global,
            ))
            raise QuorumNotMet(message)
        strategy = plan.strategy
        out = tmp / "new_global.safetensors"
        # server optimiser state (FedOpt family): the previous round's, via HEAD, checksum-verified
        state_in_ref = head.server_state if head else None
        state_in = env.fetch(state_in_ref, tmp) if state_in_ref else None
        state_out = tmp / "server_state.safetensors"
        info = aggregate_files(
            strategy.name, strategy.params, inputs, out,
            global_path=global_path, state_in=state_in, state_out=state_out,
        )
        server_state, new_global = store_new_global(env, plan, info, out, state_out, len(inputs))

    result = Result(
        job=env.args.job,
        round=r,
        dag_run_id=plan.dag_run_id,
        committed=True,
        sampled=sampled,
        strategy=strategy,
        differential_privacy=plan.differential_privacy,
        accepted=accepted,
        rejected=rejected,
        input_global=plan.input_global,
        new_global=new_global,
        server_state_in=state_in_ref,
        server_state=server_state,
        committed_at=now(),
    )
    commit_result(env, result, head, head_version)
    log(
        f"round {r}: {strategy.name} over {len(accepted)} update(s) "
        f"({', '.join(accepted)}); committed global {new_global.sha256[:12]}"
    )
    write_result(_summary(result))


def store_new_global(env: StepEnv, plan: Plan, info: dict[str, Any], out: Path, state_out: Path,
                     n_updates: int) -> tuple[ObjectRef | None, ObjectRef]:
    """What follows the aggregation, alike for a flat and a regional round: the server optimiser's new
    state stored, server-side DP noise added once (scaled by all ``n_updates`` aggregated updates),
    the new global stored. Returns (server state, new global) as the result records them."""
    r = plan.round
    if info.get("state_reset"):
        log(f"round {r}: {info['state_reset']}")
    server_state = None
    if info["state_written"]:
        state_key = env.keys.server_state(r)
        server_state = ObjectRef(key=state_key, sha256=env.store.put_file(state_key, state_out))
    dp = plan.differential_privacy
    if dp:
        stddev = noise_stddev(dp.noise_multiplier, dp.clipping_norm, n_updates)
        add_gaussian_noise(out, stddev)
        log(f"round {r}: differential privacy ({dp.mode}-side clipping): Gaussian noise std {stddev:.4g}")
    new_key = env.keys.global_model(r + 1)
    return server_state, ObjectRef(key=new_key, sha256=env.store.put_file(new_key, out))


def commit_result(env: StepEnv, result: Result, head: Head | None, head_version: str | None) -> None:
    """Commit the round (result.json created, then HEAD moved, both conditionally); a writer that lost
    the round to another run records the loss, changes nothing else, and fails."""
    try:
        commit.commit_round(env.store, env.keys, result, head, head_version,
                            before_head=lambda: crash_point("aggregate:before-head"))
    except commit.RoundConflict as conflict:
        commit.record_lost(env.store, env.keys, conflict)
        raise


def _checked_update(env: StepEnv, plan: Plan, name: str, global_path: Path,
                    tmp: Path) -> tuple[Path, AcceptedUpdate] | str:
    """The silo's update, verified and guarded (and clipped for server-side DP), or why it is rejected.

    Only the silo's own key is read (a manifest may not point at another silo's update), and the
    sha256 of the bytes read must be the one this run's validate step accepted: an update replaced
    after validation is rejected even when its manifest was rewritten to match."""
    manifest = current_manifest(env, plan, name)
    if manifest is None:
        return missing_update_reason(env, plan.round, name)
    own_key = env.keys.update(plan.round, name)
    if manifest.key != own_key:
        return f"the manifest names {manifest.key} as the update, not the silo's own {own_key}"
    verdict = env.store.get_record_or_none(env.keys.verdict(plan.round, name), Verdict)
    if verdict is not None and verdict.dag_run_id != plan.dag_run_id:
        verdict = None  # an earlier run's attempt at the round: says nothing about this update
    if verdict is not None and verdict.update_sha256 == manifest.sha256 and not verdict.accepted:
        return f"rejected by the silo's validation: {verdict.reason}"
    path = tmp / f"{name}.update.safetensors"
    try:
        read_sha256 = env.store.get_file(own_key, path, manifest.sha256)
    except ChecksumMismatch as exc:
        return str(exc)
    if verdict is not None and read_sha256 != verdict.update_sha256:
        return (f"the update changed after validation: validate checked sha256 {verdict.update_sha256}, "
                f"the stored update has {read_sha256}")
    guard = check_with_spec_guards(path, global_path, manifest.num_examples, plan.guards)
    if not guard.accepted or manifest.num_examples is None:
        return guard.reason
    dp = plan.differential_privacy
    if dp and dp.mode == "server":
        clipped = tmp / f"{name}.clipped.safetensors"
        factor, norm = clip_file(path, global_path, clipped, dp.clipping_norm)
        log(f"round {plan.round}: silo {name} update norm {norm:.4g} clipped by factor {factor:.4g}")
        path = clipped
    return path, AcceptedUpdate(sha256=manifest.sha256, num_examples=manifest.num_examples,
                                update_norm=guard.update_norm)


def _summary(result: Result) -> dict:
    """The step's XCom: accepted/rejected silos and the new global."""
    return {
        "round": result.round,
        "accepted": {n: a.model_dump() for n, a in result.accepted.items()},
        "rejected": result.rejected,
        "new_global": result.new_global.model_dump() if result.new_global else None,
    }
