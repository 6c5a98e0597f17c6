"""The global aggregate of a job with regions: combine the regions' partials, then commit.

Called by the aggregate step when the round's plan has regions. Reads each region's
:class:`~fl_tasks.records.RegionPartial` from the job's store (never a silo's update: those stay in
the regions' stores), verifies each partial's sha256, applies the global quorum of regions (and the
job's quorum on the accepted updates across them), combines the partials (exact FedAvg for the FedAvg
family, the spec's named rule for robust strategies), runs the server optimiser and server-side DP
noise once, and commits with the same protocol as a flat round (result.json created, HEAD moved
last, idempotent retries). ``result.json`` names each region's partial or why it has none.
"""

from __future__ import annotations

from pathlib import Path

from fl_tasks import commit
from fl_tasks.aggregation.partials import global_from_partials
from fl_tasks.records import AcceptedUpdate, Head, ObjectRef, Plan, RegionOutcome, RegionPartial, Result
from fl_tasks.spec import EXACT_REGION_STRATEGIES, AcrossRegions
from fl_tasks.steps.aggregate import commit_result, store_new_global
from fl_tasks.steps.common import StepEnv, log, now, scratch_dir, write_result
from fl_tasks.store import ChecksumMismatch, sha256_bytes


class RegionQuorumNotMet(RuntimeError):
    pass


def region_outcomes(env: StepEnv, plan: Plan, tmp: Path) -> tuple[dict[str, RegionOutcome], list[tuple[Path, float]],
                                                                 dict[str, AcceptedUpdate], dict[str, str]]:
    """Each region's outcome, the verified partial files of those that contributed, and the accepted
    and rejected silos across regions (a region without a partial rejects its silos with its reason)."""
    outcomes: dict[str, RegionOutcome] = {}
    partials: list[tuple[Path, float]] = []
    accepted: dict[str, AcceptedUpdate] = {}
    rejected: dict[str, str] = {}
    sampled = set(plan.sampled_silos)
    for region in plan.regions or []:
        key = env.keys.partial_record(plan.round, region.name)
        raw = env.store.get_bytes(key) if env.store.exists(key) else None
        record = env.store.get_record(key, RegionPartial) if raw is not None else None
        silos = [s for s in region.silos if s in sampled]
        reason = _why_not(plan, record)
        partial_path = None
        if reason is None and record is not None and record.partial is not None:
            try:
                partial_path = env.fetch(record.partial, tmp)
            except ChecksumMismatch as exc:
                reason = f"region {region.name}: {exc}"
        if reason is not None or record is None or partial_path is None:
            reason = reason or f"region {region.name}: no partial"
            outcomes[region.name] = RegionOutcome(
                contributed=False, reason=reason,
                record=ObjectRef(key=key, sha256=sha256_bytes(raw)) if raw is not None else None,
                accepted=[], rejected=dict(record.rejected) if record else {},
            )
            for silo in silos:
                rejected[silo] = (record.rejected.get(silo) if record else None) or reason
            log(f"round {plan.round}: {reason}")
            continue
        assert raw is not None
        partials.append((partial_path, record.total_weight))
        accepted.update(record.accepted)
        rejected.update(record.rejected)
        outcomes[region.name] = RegionOutcome(
            contributed=True, partial=record.partial, record=ObjectRef(key=key, sha256=sha256_bytes(raw)),
            accepted=list(record.accepted), rejected=dict(record.rejected), total_weight=record.total_weight,
        )
    return outcomes, partials, accepted, rejected


def _why_not(plan: Plan, record: RegionPartial | None) -> str | None:
    """Why a region's record does not count this round (None: it contributes)."""
    if record is None:
        return "no partial: its aggregate_region did not run, or failed before it could record why"
    if record.dag_run_id != plan.dag_run_id or record.input_global_sha256 != plan.input_global.sha256:
        return f"region {record.region}: its partial belongs to run {record.dag_run_id}, not this round's plan"
    if not record.contributed:
        return record.reason
    return None


def run(env: StepEnv, plan: Plan, head: Head | None, head_version: str | None) -> None:
    """Aggregate and commit a regional round (``head``/``head_version``: HEAD as the caller read it)."""
    r = plan.round
    across = plan.across_regions or AcrossRegions()
    with scratch_dir() as tmp:
        outcomes, partials, accepted, rejected = region_outcomes(env, plan, tmp)
        contributed = [name for name, o in outcomes.items() if o.contributed]
        need_updates = plan.quorum.required(len(plan.sampled_silos))
        problem = None
        if len(contributed) < across.min_regions:
            missing = "; ".join(f"{n}: {o.reason}" for n, o in outcomes.items() if not o.contributed)
            problem = (f"only {len(contributed)} region(s) contributed ({', '.join(contributed) or 'none'}), "
                       f"across_regions.min_regions needs {across.min_regions} (missing {missing})")
        elif len(accepted) < need_updates:
            problem = f"only {len(accepted)} accepted update(s) across regions, quorum needs {need_updates}"
        if problem is not None:
            message = f"round {r}: {problem}; HEAD stays at round {head.round if head else 0}"
            commit.record_uncommitted(env.store, env.keys, Result(
                job=env.args.job, round=r, dag_run_id=plan.dag_run_id, committed=False, reason=message,
                accepted=accepted, rejected=rejected, input_global=plan.input_global, regions=outcomes,
            ))
            raise RegionQuorumNotMet(message)
        strategy = plan.strategy
        kind = "sum" if strategy.name in EXACT_REGION_STRATEGIES else "model"
        global_path = env.fetch(plan.input_global, tmp)
        state_in_ref = head.server_state if head else None
        state_in = env.fetch(state_in_ref, tmp) if state_in_ref else None
        state_out = tmp / "server_state.safetensors"
        out = tmp / "new_global.safetensors"
        info = global_from_partials(strategy.name, strategy.params, partials, out, kind=kind, rule=across.rule,
                                    global_path=global_path, state_in=state_in, state_out=state_out, scratch=tmp)
        # DP noise once, at the global level, over every accepted update of every region
        server_state, new_global = store_new_global(env, plan, info, out, state_out, len(accepted))
    result = Result(
        job=env.args.job, round=r, dag_run_id=plan.dag_run_id, committed=True, sampled=plan.sampled_silos,
        strategy=strategy, differential_privacy=plan.differential_privacy, accepted=accepted, rejected=rejected,
        input_global=plan.input_global, new_global=new_global, server_state_in=state_in_ref,
        server_state=server_state, committed_at=now(), regions=outcomes,
    )
    commit_result(env, result, head, head_version)
    log(f"round {r}: {strategy.name} over {len(contributed)} region(s) ({', '.join(contributed)}), "
        f"{len(accepted)} update(s); committed global {new_global.sha256[:12]}")
    write_result({
        "round": r,
        "accepted": {n: a.model_dump() for n, a in accepted.items()},
        "rejected": rejected,
        "new_global": new_global.model_dump(),
        "regions": {n: o.model_dump(mode="json") for n, o in outcomes.items()},
    })
