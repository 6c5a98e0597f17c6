"""What every step shares: arguments, the store, the round's plan, and the result hand-off."""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_tasks.contract import RESULT_FILE_ENV
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

    def plan(self) -> dict:
        plan = self.store.get_json_or_none(self.keys.plan(self.round))
        if plan is None:
            raise RuntimeError(
                f"no plan for round {self.round} at {self.store.describe(self.keys.plan(self.round))}; "
                "the distribute step of this round has not run"
            )
        return plan

    def require_sampled(self, plan: dict) -> None:
        """Per-silo train/validate: a silo left out of this round's sample has nothing to do."""
        if self.args.silo not in plan.get("sampled", [s["name"] for s in plan["silos"]]):
            raise NotSampled(f"silo {self.args.silo} was not sampled for round {self.round} ({plan.get('sampling')})")

    def silo_entry(self, plan: dict) -> dict:
        for silo in plan["silos"]:
            if silo["name"] == self.args.silo:
                return silo
        raise ValueError(f"silo {self.args.silo!r} is not part of round {self.round} of job {self.args.job}")

    def fetch(self, key: str, sha256: str, into: Path) -> Path:
        """Download a verified copy of ``key`` (sha256 checked while streaming)."""
        dest = into / key.replace("/", "__")
        self.store.get_file(key, dest, sha256)
        return dest


def missing_update_reason(env: StepEnv, r: int, silo: str) -> str:
    """Why a silo has no update this round, from the status its train step recorded."""
    status = env.store.get_json_or_none(env.keys.status(r, silo))
    if status is None:
        return "no update: train did not run or was killed before it could record why"
    return f"no update: train {status['state'].replace('_', ' ')}: {status['reason']}"


@contextmanager
def scratch_dir():
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
