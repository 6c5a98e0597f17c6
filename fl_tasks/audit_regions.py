"""``airfed verify`` of a round with regions: both levels recomputed, never trusted.

For each region: its :class:`~fl_tasks.records.RegionPartial` record (sha256 as result.json holds
it), every accepted update fetched from the region's own store (sha256 as recorded), the partial
recomputed from them (clipped first under server-side DP) and compared with the partial the region
forwarded. Then the global level: the forwarded partials combined again (and the server optimiser
run again) must reproduce the committed global. Every failure names the region and the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fl_tasks.aggregation.partials import global_from_partials, write_partial_sum, write_region_model
from fl_tasks.audit import Report, compare
from fl_tasks.audit import _fetch as fetch
from fl_tasks.privacy import clip_file
from fl_tasks.records import Manifest, ObjectRef, Plan, RegionPartial, Result
from fl_tasks.spec import EXACT_REGION_STRATEGIES, AcrossRegions
from fl_tasks.store import JobKeys, ObjectMissing, Store, sha256_bytes


def recompute_regions(store: Store, region_stores: Mapping[str, Store], keys: JobKeys, plan: Plan, result: Result,
                      r: int, tmp: Path, tolerance: float, report: Report) -> None:
    """Check every region's partial against its updates, then the committed global against the partials."""
    failures_before = report.failures
    global_path = fetch(store, plan.input_global, tmp / "input_global.safetensors", report, "input global")
    outcomes = result.regions or {}
    partials: list[tuple[Path, float]] = []
    kind = "sum" if plan.strategy.name in EXACT_REGION_STRATEGIES else "model"
    for region in plan.regions or []:
        name = region.name
        outcome = outcomes.get(name)
        if outcome is None or outcome.record is None:
            report.fail(keys.result(r), f"region {name}: result.json records no partial record")
            continue
        try:
            raw = store.get_bytes(outcome.record.key)
        except ObjectMissing:
            report.fail(outcome.record.key, f"region {name}: partial record missing")
            continue
        if not report.check(sha256_bytes(raw) == outcome.record.sha256, outcome.record.key,
                            f"region {name}: record sha256 matches result.json",
                            f"region {name}: record sha256 {sha256_bytes(raw)} differs from result.json's "
                            f"{outcome.record.sha256}"):
            continue
        record = store.get_record(outcome.record.key, RegionPartial)
        if not outcome.contributed:
            report.ok(outcome.record.key, f"region {name}: contributed nothing: {outcome.reason}")
            continue
        assert outcome.partial is not None
        stored = fetch(store, outcome.partial, tmp / f"partial_{name}.safetensors", report,
                       f"region {name}: forwarded partial")
        if stored is not None:
            partials.append((stored, outcome.total_weight))
        if global_path is None or stored is None:
            continue
        region_store = region_stores.get(name)
        if region_store is None:
            report.skip(outcome.partial.key, f"region {name}: partial not recomputed: its store is not given")
            continue
        _recompute_partial(region_store, keys, plan, record, r, name, kind, global_path, stored, outcome.partial,
                           tmp, tolerance, report)
    new_key = result.new_global.key if result.new_global else keys.result(r)
    new_global = fetch(store, result.new_global, tmp / "new_global.safetensors", report, "new global")
    if report.failures > failures_before or new_global is None or global_path is None:
        report.skip(new_key, "global level not recomputed: its inputs failed the checks above")
        return
    if result.differential_privacy:
        report.skip(new_key, "global level not recomputed: the round added differential-privacy noise")
        return
    state_in = None
    if result.server_state_in:
        state_in = fetch(store, result.server_state_in, tmp / "state_in.safetensors", report, "server state before")
    strategy = result.strategy or plan.strategy
    recomputed = tmp / "recomputed_global.safetensors"
    rule = (plan.across_regions or AcrossRegions()).rule
    global_from_partials(strategy.name, strategy.params, partials, recomputed, kind=kind, rule=rule,
                         global_path=global_path, state_in=state_in,
                         state_out=tmp / "recomputed_state.safetensors", scratch=tmp)
    contributed = [n for n, o in outcomes.items() if o.contributed]
    compare(recomputed, new_global, new_key, f"{strategy.name} over the partials of {', '.join(contributed)}",
            "the committed global", tolerance, report)


def _recompute_partial(region_store: Store, keys: JobKeys, plan: Plan, record: RegionPartial, r: int, name: str,
                       kind: str, global_path: Path, stored: Path, ref: ObjectRef, tmp: Path, tolerance: float,
                       report: Report) -> None:
    inputs: list[tuple[Path, float]] = []
    ok = True
    for silo, accepted in record.accepted.items():
        try:
            manifest = region_store.get_record(keys.manifest(r, silo), Manifest)
        except ObjectMissing:
            manifest = None
        report.check(
            manifest is not None and manifest.sha256 == accepted.sha256, keys.manifest(r, silo),
            f"region {name}: manifest of {silo} matches the partial record",
            f"region {name}: manifest of {silo} missing or its sha256 differs from the partial record's")
        path = fetch(region_store, ObjectRef(key=keys.update(r, silo), sha256=accepted.sha256),
                     tmp / f"{name}_{silo}.safetensors", report, f"region {name}: update of {silo}")
        if path is None:
            ok = False
            continue
        dp = plan.differential_privacy
        if dp and dp.mode == "server":  # the regional aggregator clipped before summing
            clipped = tmp / f"{name}_{silo}.clipped.safetensors"
            clip_file(path, global_path, clipped, dp.clipping_norm)
            path = clipped
        inputs.append((path, float(accepted.num_examples)))
    if not ok or not inputs:
        report.skip(ref.key, f"region {name}: partial not recomputed: its updates failed the checks above")
        return
    recomputed = tmp / f"recomputed_partial_{name}.safetensors"
    if kind == "sum":
        total = write_partial_sum(inputs, recomputed)
    else:
        total = write_region_model(plan.strategy.name, plan.strategy.params, inputs, recomputed)
    report.check(abs(total - record.total_weight) <= 1e-9 * max(1.0, total), ref.key,
                 f"region {name}: total weight {total:g} matches", f"region {name}: total weight recomputed {total:g}, "
                 f"recorded {record.total_weight:g}")
    compare(recomputed, stored, ref.key, f"region {name}: partial over {', '.join(record.accepted)}",
            "the forwarded partial", tolerance, report)
