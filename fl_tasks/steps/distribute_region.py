"""distribute_region: the round's plan and input global, from the job's store into the region's.

Runs in the region's placement after distribute, so the region's silos read only their region's store.
"""

from __future__ import annotations

from fl_tasks.steps.common import StepEnv, log, write_result
from fl_tasks.steps.regional import RegionEnv


def run(env: StepEnv) -> None:
    region = RegionEnv(env)
    plan = region.plan()
    entry = region.entry(plan)
    if not region.shared:
        region.copy_record(env.keys.plan(plan.round), region.job.store, region.region.store)
        region.copy_object(plan.input_global, region.job.store, region.region.store)
    log(f"round {plan.round}: region {entry.name} has the plan and global {plan.input_global.sha256[:12]} "
        f"for {', '.join(entry.silos)}")
    write_result({"round": plan.round, "region": entry.name, "silos": entry.silos})
