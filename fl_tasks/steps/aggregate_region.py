"""aggregate_region: a region's aggregator. Guards its silos' updates, applies the region's quorum and
forwards only its partial aggregate to the job's store.

Reads the updates from the region's store (they never leave it), runs the same server-side checks as
the flat aggregate step (checksum, layout, finite values, example count, norm bound; server-side DP
clipping), then writes ``rounds/<r>/regions/<region>.safetensors`` (the partial: float64 weighted
sums for the FedAvg family, the region's robust aggregate otherwise) and ``<region>.json``
(:class:`~fl_tasks.records.RegionPartial`: its sha256, accepted silos, total weight) to the job's
store, and copies the silos' manifests, verdicts and statuses up (JSON: counts, metrics, checksums).
A region below its quorum writes a record that says why and no partial; it is not a failure of the
step (the global quorum of regions decides). Retries recompute the same keys.
"""

from __future__ import annotations

from pathlib import Path

from fl_tasks.aggregation.partials import write_partial_sum, write_region_model
from fl_tasks.records import AcceptedUpdate, ObjectRef, RegionPartial
from fl_tasks.spec import EXACT_REGION_STRATEGIES
from fl_tasks.steps.aggregate import _checked_update
from fl_tasks.steps.common import StepEnv, log, scratch_dir, write_result
from fl_tasks.steps.regional import RegionEnv


def run(env: StepEnv) -> None:
    region = RegionEnv(env)
    plan = region.plan()
    entry = region.entry(plan)
    r = plan.round
    sampled = [s for s in plan.sampled_silos if s in entry.silos]
    accepted: dict[str, AcceptedUpdate] = {}
    rejected: dict[str, str] = {}
    head = {"job": plan.job, "round": r, "region": entry.name, "dag_run_id": plan.dag_run_id,
            "input_global_sha256": plan.input_global.sha256, "strategy": plan.strategy.name}
    with scratch_dir() as tmp:
        global_path = region.region.fetch(plan.input_global, tmp)
        inputs: list[tuple[Path, float]] = []
        for name in sampled:
            update = _checked_update(region.region, plan, name, global_path, tmp)
            if isinstance(update, str):
                rejected[name] = update
                log(f"round {r}: region {entry.name}: silo {name} rejected: {update}")
                continue
            path, accepted_update = update
            accepted[name] = accepted_update
            inputs.append((path, float(accepted_update.num_examples)))
        if not region.shared:
            _copy_silo_records(region, r, entry.silos)
        need = entry.quorum.required(len(sampled))
        if len(accepted) < need:
            reason = (f"region {entry.name} below its quorum: {len(accepted)} accepted update(s) "
                      f"({', '.join(accepted) or 'none'}) of {len(sampled)}, quorum needs {need}")
            env.store.put_record(env.keys.partial_record(r, entry.name), RegionPartial(
                **head, contributed=False, reason=reason, accepted=accepted, rejected=rejected))
            log(f"round {r}: {reason}; the region contributes nothing")
            write_result({"round": r, "region": entry.name, "contributed": False, "reason": reason,
                          "accepted": list(accepted), "rejected": rejected})
            return
        out = tmp / "partial.safetensors"
        strategy = plan.strategy
        if strategy.name in EXACT_REGION_STRATEGIES:
            kind, total = "sum", write_partial_sum(inputs, out)
        else:
            kind, total = "model", write_region_model(strategy.name, strategy.params, inputs, out)
        key = env.keys.partial(r, entry.name)
        partial = ObjectRef(key=key, sha256=env.store.put_file(key, out))
    record = RegionPartial(**head, contributed=True, kind=kind, partial=partial, total_weight=total,
                           accepted=accepted, rejected=rejected)
    env.store.put_record(env.keys.partial_record(r, entry.name), record)
    log(f"round {r}: region {entry.name}: partial ({kind}) over {len(accepted)} update(s) "
        f"({', '.join(accepted)}), total weight {total:g}, sha256 {partial.sha256[:12]}")
    write_result({"round": r, "region": entry.name, "contributed": True, "accepted": list(accepted),
                  "rejected": rejected, "total_weight": total, "partial": partial.model_dump()})


def _copy_silo_records(region: RegionEnv, r: int, silos: list[str]) -> None:
    """The silos' JSON records up to the job's store (register reads metrics and checksums there)."""
    keys = region.job.keys
    for silo in silos:
        for key in (keys.manifest(r, silo), keys.verdict(r, silo), keys.status(r, silo)):
            region.copy_record(key, region.region.store, region.job.store)


def record_failure(env: StepEnv, exc: BaseException) -> None:
    """The region failed as a whole (its store unreachable, say): say why in the job's store, where the
    global aggregator looks. Touches only the job's store."""
    plan = env.plan()
    name = env.args.region or ""
    reason = f"region {name}: aggregate_region failed: {type(exc).__name__}: {exc}"
    env.store.put_record(env.keys.partial_record(plan.round, name), RegionPartial(
        job=plan.job, round=plan.round, region=name, dag_run_id=plan.dag_run_id, contributed=False,
        reason=reason, input_global_sha256=plan.input_global.sha256, strategy=plan.strategy.name,
    ))
