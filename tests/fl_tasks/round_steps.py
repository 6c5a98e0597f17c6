"""Round steps run in-process, as ``python -m fl_tasks`` would run them, on the digits example.

The ``job`` fixture (tests/fl_tasks/conftest.py) prepares the data and the spec; these helpers run
one step, or a round's train and aggregate, for a given DAG run id.
"""

from __future__ import annotations

from pathlib import Path

from fl_tasks.__main__ import main as step_main

REPO = Path(__file__).resolve().parents[2]
SILOS = ("us", "eu", "asia")


def step(name: str, job: str, run_id: str, r: int | str = "next", silo: str | None = None,
         training: str | None = None) -> int:
    argv = [name, "--job", job, "--round", str(r), "--run-id", run_id]
    if silo:
        argv += ["--silo", silo]
    if training:
        argv += ["--training", training]
    return step_main(argv)


def train_and_commit(job: str, run_id: str, r: int) -> None:
    for silo in SILOS:
        step("train", job, run_id, r, silo)
    step("aggregate", job, run_id, r)
