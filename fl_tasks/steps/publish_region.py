"""publish_region: the committed round's result and new global, from the job's store into the region's,
so the region's silos evaluate the new global from their own store.

The result is read against HEAD's sha256 (as ``evaluate`` and ``register`` read it in the job's
store), and HEAD goes down with it, byte for byte, so ``evaluate`` in the region checks the result
it reads there the same way."""

from __future__ import annotations

from fl_tasks.records import Head, Result
from fl_tasks.steps.common import StepEnv, log, write_result
from fl_tasks.steps.regional import RegionEnv


def run(env: StepEnv) -> None:
    region = RegionEnv(env)
    plan = region.plan()
    entry = region.entry(plan)
    head = region.job.store.get_record_or_none(env.keys.head, Head)
    current = head is not None and head.round == plan.round  # HEAD still names this round's result
    result = region.job.store.get_record(env.keys.result(plan.round), Result,
                                         head.result_sha256 if head is not None and current else None)
    if not result.committed or result.new_global is None:
        raise RuntimeError(f"round {plan.round} was not committed: {result.reason}")
    if not region.shared:
        region.copy_record(env.keys.result(plan.round), region.job.store, region.region.store)
        region.copy_object(result.new_global, region.job.store, region.region.store)
        if current:
            region.copy_record(env.keys.head, region.job.store, region.region.store)
    log(f"round {plan.round}: region {entry.name} has the new global {result.new_global.sha256[:12]}")
    write_result({"round": plan.round, "region": entry.name, "new_global": result.new_global.model_dump()})
