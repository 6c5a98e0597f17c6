"""What the regional-tier steps share: the region's store beside the job's, and the copies between them.

A regional-tier step (``distribute_region``, ``aggregate_region``, ``publish_region``,
``collect_region``) runs in its region's placement with two stores: the job's (``AIRFED_STORE_URL``,
as every step) and the region's (``AIRFED_REGION_STORE_URL``; unset: the job's store itself), opened
with the ``AIRFED_REGION_AWS_*`` settings when the region's store has an endpoint or keys of its own. Only
these steps move objects between the two, and only these: the round's plan and global models down,
the region's partial aggregate and the silos' small JSON records (manifests, verdicts, statuses,
evaluations: counts, metrics and checksums) up. A silo's update object is never copied.
"""

from __future__ import annotations

import os

from fl_tasks.records import ObjectRef, Plan, PlanRegion
from fl_tasks.regions import REGION_STORE_URL_ENV, region_store_environ
from fl_tasks.steps.common import StepArgs, StepEnv, log, scratch_dir
from fl_tasks.store import ObjectMissing, Store, open_store


class RegionEnv:
    """A regional-tier step's view: the job's store (``job``) and its region's (``region``)."""

    def __init__(self, env: StepEnv):
        if not env.args.region:
            raise ValueError(f"step {env.args.step} needs --region")
        self.job = env
        url = os.environ.get(REGION_STORE_URL_ENV)
        self.shared = not url  # the region keeps its objects in the job's store
        self.region = env if self.shared else StepEnv(self._args(env.args),
                                                      open_store(url, region_store_environ(os.environ,
                                                                                           env.args.region)))
        self.name = env.args.region

    @staticmethod
    def _args(args: StepArgs) -> StepArgs:
        return StepArgs(args.step, args.job, args.round, args.run_id, args.silo, args.chain_id, args.training,
                        args.region)

    def plan(self) -> Plan:
        return self.job.plan()

    def entry(self, plan: Plan) -> PlanRegion:
        if plan.regions is None:
            raise ValueError(f"round {plan.round} of job {plan.job} has no regions")
        return plan.region(self.name or "")

    def copy_record(self, key: str, source: Store, dest: Store) -> bool:
        """Copy one JSON record byte for byte (its sha256 stays what referrers recorded); False if absent."""
        try:
            data = source.get_bytes(key)
        except ObjectMissing:
            return False
        dest.put_bytes(key, data)
        return True

    def copy_object(self, ref: ObjectRef, source: Store, dest: Store) -> None:
        """Copy a model file, its sha256 checked on the way."""
        if dest.exists(ref.key):
            try:
                with scratch_dir() as tmp:
                    dest.get_file(ref.key, tmp / "check.safetensors", ref.sha256)
                return
            except Exception:  # noqa: BLE001 - a stale or broken copy is replaced below
                pass
        with scratch_dir() as tmp:
            path = tmp / "object.safetensors"
            source.get_file(ref.key, path, ref.sha256)
            written = dest.put_file(ref.key, path)
        if written != ref.sha256:
            raise RuntimeError(f"copy of {ref.key} has sha256 {written}, expected {ref.sha256}")
        log(f"region {self.name}: copied {ref.key} ({ref.sha256[:12]})")
