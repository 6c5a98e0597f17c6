"""What every step shares: arguments, the store, the round's plan, and the result hand-off."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_tasks.contract import RESULT_FILE_ENV
from fl_tasks.records import Manifest, ObjectRef, Plan, PlanSilo, TrainStatus
from fl_tasks.store import JobKeys, Store, open_store


class NotSampled(Exception):
    """The silo is not in this round's sample: the step exits with SKIP_EXIT_CODE (task skipped)."""


def log(message: str) -> None:
    """Step progress goes to stdout; the runner streams it into the Airflow task log."""
    print(f"[airfed] {message}", flush=True)


@dataclass
class StepArgs:
    step: str
    job: str
    round: int | None
    run_id: str
    silo: str | None = None
    chain_id: str | None = None
    training: dict[str, Any] | None = None
    region: str | None = None
    decision: dict[str, Any] | None = None


class StepEnv:
    """The store, key names and records of one job, opened once per step."""

    def __init__(self, args: StepArgs, store: Store | None = None):
        self.args = args
        self.store = store or open_store()
        self.keys = JobKeys(args.job)

    @property
    def round(self) -> int:
        if self.args.round is None:
            raise ValueError(f"step {self.args.step} needs --round")
        return self.args.round

    def plan(self) -> Plan:
        return self.plan_of(self.round)

    def plan_of(self, r: int) -> Plan:
        plan = self.store.get_record_or_none(self.keys.plan(r), Plan)
        if plan is None:
            raise RuntimeError(
                f"no plan for round {r} at {self.store.describe(self.keys.plan(r))}; "
                "the distribute step of this round has not run"
            )
        return plan

    def require_sampled(self, plan: Plan) -> None:
        """Per-silo train/validate: a silo left out of this round's sample has nothing to do."""
        if self.args.silo not in plan.sampled_silos:
            sampling = plan.sampling.model_dump() if plan.sampling else None
            raise NotSampled(f"silo {self.args.silo} was not sampled for round {self.round} ({sampling})")

    def silo_entry(self, plan: Plan) -> PlanSilo:
        return plan.silo(self.args.silo)

    def fetch(self, ref: ObjectRef, into: Path) -> Path:
        """Download a verified copy of ``ref`` (sha256 checked while streaming)."""
        dest = into / ref.key.replace("/", "__")
        self.store.get_file(ref.key, dest, ref.sha256)
        return dest


def current_manifest(env: StepEnv, plan: Plan, silo: str) -> Manifest | None:
    """The silo's manifest for this round, if its train step of this plan's DAG run wrote one (one
    left over from an earlier, uncommitted attempt at the round does not count)."""
    manifest = env.store.get_record_or_none(env.keys.manifest(plan.round, silo), Manifest)
    return manifest if manifest is not None and manifest.dag_run_id == plan.dag_run_id else None


def missing_update_reason(env: StepEnv, r: int, silo: str) -> str:
    """Why a silo has no update this round, from the status its train step recorded."""
    status = env.store.get_record_or_none(env.keys.status(r, silo), TrainStatus)
    if status is None:
        return "no update: train did not run or was killed before it could record why"
    return status.describe()


@contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="airfed-") as tmp:
        yield Path(tmp)


def write_result(result: dict[str, Any]) -> None:
    """Hand the step's JSON result to the runner (becomes the task's XCom) and print it."""
    path = os.environ.get(RESULT_FILE_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result))
    log(f"result: {json.dumps(result, sort_keys=True)}")


def now() -> float:
    return time.time()
