"""A run whose aggregate failed for good (say the store was unreachable through all its retries)
gives its round up when its register step runs, so the next run takes the round over instead of
finding it claimed for the claim's whole lease (6 h). In-process, real steps, local store."""

from __future__ import annotations

import pytest
from round_steps import SILOS, step, train_and_commit

from fl_tasks.records import Head, Plan, Result
from fl_tasks.steps.register import RoundNotCommitted
from fl_tasks.store import JobKeys, open_store


def test_a_round_whose_aggregate_failed_is_given_up_and_redone_by_the_next_run(job: str) -> None:
    store, keys = open_store(), JobKeys(job)
    step("distribute", job, "run-A")
    for silo in SILOS:
        step("train", job, "run-A", 1, silo)
    # run-A's aggregate failed after its retries, before writing anything; register runs (all_done)
    with pytest.raises(RoundNotCommitted, match="round 1 was not committed"):
        step("register", job, "run-A", 1)
    given_up = store.get_record(keys.result(1), Result)
    assert (given_up.committed, given_up.dag_run_id) == (False, "run-A")
    assert "aggregate did not commit" in (given_up.reason or "")
    assert store.get_record_or_none(keys.head, Head) is None

    step("distribute", job, "run-B")  # takes the round over instead of RoundClaimed
    assert store.get_record(keys.plan(1), Plan).dag_run_id == "run-B"
    train_and_commit(job, "run-B", 1)
    head = store.get_record(keys.head, Head)
    assert (head.round, head.dag_run_id) == (1, "run-B")


def test_register_never_gives_up_a_round_that_another_run_holds(job: str) -> None:
    store, keys = open_store(), JobKeys(job)
    step("distribute", job, "run-A")
    plan_a = store.get_record(keys.plan(1), Plan)
    # a register of another run on round 1 (its distribute lost the claim) leaves run-A's claim alone
    with pytest.raises(RoundNotCommitted):
        step("register", job, "run-B", 1)
    assert store.get_record_or_none(keys.result(1), Result) is None
    assert store.get_record(keys.plan(1), Plan) == plan_a
