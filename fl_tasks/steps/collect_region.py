"""collect_region: the region's evaluation records (metrics of the new global) up to the job's store,
where register reads them. Runs whatever the evaluations' state (a failed silo has no record)."""

from __future__ import annotations

from fl_tasks.steps.common import StepEnv, log, write_result
from fl_tasks.steps.regional import RegionEnv


def run(env: StepEnv) -> None:
    region = RegionEnv(env)
    plan = region.plan()
    entry = region.entry(plan)
    keys = [(silo, env.keys.evaluation(plan.round, silo)) for silo in entry.silos]
    if region.shared:
        found = [silo for silo, key in keys if region.job.store.exists(key)]
    else:
        found = [silo for silo, key in keys if region.copy_record(key, region.region.store, region.job.store)]
    log(f"round {plan.round}: region {entry.name} evaluations collected from {', '.join(found) or 'no silo'}")
    write_result({"round": plan.round, "region": entry.name, "evaluated": found})
