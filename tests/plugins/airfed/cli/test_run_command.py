"""``airfed run``'s round loop in-process: one dag.test() per round with rounds=1, chained by id."""

from __future__ import annotations

import io
from types import SimpleNamespace

from airfed.cli.run import progress_line, run_rounds
from airfed.spec import load_spec
from helpers import EXAMPLE_SPEC

from fl_tasks.store import JobKeys, open_store


class FakeDag:
    """Stands in for the DAG: each test() commits the next round (or fails at round ``fail_at``)."""

    def __init__(self, store, job: str, fail_at: int | None = None, overtaken_at: int | None = None):
        self.store, self.keys, self.fail_at, self.overtaken_at = store, JobKeys(job), fail_at, overtaken_at
        self.confs: list[dict] = []

    def commit(self, run_id: str) -> int:
        head = self.store.get_json_or_none(self.keys.head)
        r = (head["round"] if head else 0) + 1
        self.store.put_json(self.keys.registry(r), {
            "round": r, "dag_run_id": run_id, "accepted": ["a", "b"], "rejected": {}, "train_loss": 0.5,
            "metrics": {"accuracy": 0.5 + r / 100}, "promotion_metric": "accuracy", "promotion_value": 0.5 + r / 100,
            "registry_version": r, "champion_version": r,
        })
        self.store.put_json(self.keys.head, {"round": r})
        return r

    def test(self, run_conf: dict):
        self.confs.append(run_conf)
        head = self.store.get_json_or_none(self.keys.head)
        r = (head["round"] if head else 0) + 1
        run_id = f"manual__run{r}"
        if r == self.fail_at:
            return SimpleNamespace(state="failed", run_id=run_id)
        self.commit(run_id)
        if r == self.overtaken_at:  # another run commits the next round before this one's result is read
            self.commit("scheduled__other")
        return SimpleNamespace(state="success", run_id=run_id)


def test_one_dag_run_per_round_chained_by_the_first_runs_id(tmp_path):
    spec = load_spec(EXAMPLE_SPEC)
    store = open_store(f"file://{tmp_path}")
    dag = FakeDag(store, spec.job)
    out = io.StringIO()
    rounds, run_ids, state = run_rounds(dag, spec, store, 3, {"lr": 0.2}, out)
    assert state == "success" and run_ids == ["manual__run1", "manual__run2", "manual__run3"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and [r["dag_run_id"] for r in rounds] == run_ids
    training = {**spec.training, "lr": 0.2}
    assert dag.confs == [
        {"rounds": 1, "training": training},  # never more than one round per dag.test(): nothing to chain
        {"rounds": 1, "training": training, "chain_id": "manual__run1"},
        {"rounds": 1, "training": training, "chain_id": "manual__run1"},
    ]
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == ["round   1", "round   2", "round   3"]


def test_the_loop_stops_at_the_first_round_that_does_not_commit(tmp_path):
    spec = load_spec(EXAMPLE_SPEC)
    store = open_store(f"file://{tmp_path}")
    dag = FakeDag(store, spec.job, fail_at=2)
    rounds, run_ids, state = run_rounds(dag, spec, store, 5, None, io.StringIO())
    assert state == "failed" and [r["round"] for r in rounds] == [1] and len(dag.confs) == 2
    assert run_ids == ["manual__run1", "manual__run2"]
    assert "training" not in dag.confs[0]


def test_a_round_is_reported_even_when_another_run_committed_the_next_one_meanwhile(tmp_path):
    """Two runs at once (tests/e2e/test_concurrent_runs.py under load): HEAD moved on past this run's round."""
    spec = load_spec(EXAMPLE_SPEC)
    store = open_store(f"file://{tmp_path}")
    dag = FakeDag(store, spec.job, overtaken_at=1)
    rounds, run_ids, state = run_rounds(dag, spec, store, 2, None, io.StringIO())
    assert state == "success" and [r["round"] for r in rounds] == [1, 3]
    assert [r["dag_run_id"] for r in rounds] == run_ids == ["manual__run1", "manual__run3"]


def test_progress_line():
    rec = {"round": 3, "accepted": ["us", "eu"], "rejected": {"asia": "nan"}, "train_loss": 0.41,
           "promotion_metric": "accuracy", "promotion_value": 0.91, "registry_version": 3, "champion_version": 2}
    assert progress_line(rec, 4.24) == (
        "round   3 | silos 2/3 accepted (rejected: asia) | train loss 0.4100 | val accuracy 0.9100 "
        "| model v3 (champion v2) | 4.2s"
    )


def test_progress_line_says_a_candidate_awaits_approval():
    rec = {"round": 2, "accepted": ["us"], "rejected": {}, "train_loss": None, "promotion_metric": "accuracy",
           "promotion_value": 0.93, "registry_version": 2, "champion_version": None, "awaiting_approval": True}
    assert progress_line(rec, None).endswith("| model v2 (awaiting approval)")
    assert progress_line({**rec, "champion_version": 1}, None).endswith("| model v2 (awaiting approval; champion v1)")
