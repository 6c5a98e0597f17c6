"""Exactly-once rounds with two writers on one job, at the step level, in-process (real steps, real
local store, the digits example): plans are claimed, a round commits once, the loser names the
winner and changes nothing, and every committed round trains from the previous round's output."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from round_steps import SILOS, step, train_and_commit

from fl_tasks import commit
from fl_tasks.records import Head, LostRound, ObjectRef, Plan, Result
from fl_tasks.store import JobKeys, open_store


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, job: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The job's store on either backend (S3: moto on loopback)."""
    if request.param == "s3":
        monkeypatch.setenv("AIRFED_STORE_URL", request.getfixturevalue("s3_store_url"))
    return job


def test_second_run_finds_the_round_claimed_and_changes_nothing(backend: str) -> None:
    job = backend
    store, keys = open_store(), JobKeys(job)
    step("distribute", job, "run-A", training='{"lr": 0.05}')
    plan_a = store.get_record(keys.plan(1), Plan)
    global_a = store.get_bytes(keys.global_model(1))
    with pytest.raises(commit.RoundClaimed, match="round 1 of job digits is already claimed by run run-A"):
        step("distribute", job, "run-B", training='{"lr": 0.5}')
    assert store.get_record(keys.plan(1), Plan) == plan_a  # A's plan, A's config
    assert store.get_bytes(keys.global_model(1)) == global_a  # B's initial model never written
    lost = store.get_record(keys.lost("run-B"), LostRound)
    assert (lost.round, lost.winner, lost.stage) == (1, "run-A", "plan")
    # a retry of A's distribute reuses its plan
    step("distribute", job, "run-A")
    assert store.get_record(keys.plan(1), Plan) == plan_a
    train_and_commit(job, "run-A", 1)
    head = store.get_record(keys.head, Head)
    assert (head.round, head.dag_run_id) == (1, "run-A")
    assert commit.run_rounds(store, keys, "run-A", 1)["committed"] == [1]
    outcome_b = commit.run_rounds(store, keys, "run-B", 1)
    assert outcome_b["committed"] == [] and outcome_b["committed_by_others"] == {1: "run-A"}
    assert outcome_b["lost"]["winner"] == "run-A"


def test_waiting_run_plans_the_next_round_from_the_winners_head(job: str, monkeypatch) -> None:
    store, keys = open_store(), JobKeys(job)
    step("distribute", job, "run-A")
    monkeypatch.setenv(commit.WAIT_ENV, "120")
    errors: list[BaseException] = []

    def run_b() -> None:
        try:
            step("distribute", job, "run-B", training='{"lr": 0.07}')
        except BaseException as exc:  # pragma: no cover - asserted below
            errors.append(exc)

    waiter = threading.Thread(target=run_b)
    waiter.start()
    train_and_commit(job, "run-A", 1)
    waiter.join(timeout=60)
    assert not waiter.is_alive() and not errors
    plan2 = store.get_record(keys.plan(2), Plan)
    result1 = store.get_record(keys.result(1), Result)
    assert plan2.dag_run_id == "run-B" and plan2.training["lr"] == 0.07
    assert plan2.input_global == result1.new_global  # round 2 trains from round 1's committed output
    train_and_commit(job, "run-B", 2)
    result2 = store.get_record(keys.result(2), Result)
    assert (result2.dag_run_id, result2.input_global) == ("run-B", result1.new_global)
    assert store.get_record(keys.head, Head).round == 2
    # A's next distribute plans round 3 from B's head
    step("distribute", job, "run-A")
    assert store.get_record(keys.plan(3), Plan).input_global == result2.new_global


def test_a_taken_over_claim_cannot_commit(job: str, monkeypatch) -> None:
    """A claim past its lease is taken over; the old owner (a zombie) then refuses to commit."""
    store, keys = open_store(), JobKeys(job)
    step("distribute", job, "run-A")
    for silo in SILOS:
        step("train", job, "run-A", 1, silo)
    monkeypatch.setenv(commit.LEASE_ENV, "0.001")
    step("distribute", job, "run-B")
    assert store.get_record(keys.plan(1), Plan).dag_run_id == "run-B"
    with pytest.raises(commit.RoundCommittedElsewhere, match="now planned by run run-B"):
        step("aggregate", job, "run-A", 1)
    assert not store.exists(keys.result(1)) and not store.exists(keys.head)
    assert store.get_record(keys.lost("run-A"), LostRound).winner == "run-B"
    train_and_commit(job, "run-B", 1)
    assert store.get_record(keys.head, Head).dag_run_id == "run-B"


@pytest.mark.parametrize("backend_name", ["local", "s3"])
def test_commit_race_one_winner(tmp_path: Path, backend_name: str, request: pytest.FixtureRequest) -> None:
    """Eight writers commit round 2 on top of round 1 at once: one result, one HEAD move."""
    url = f"file://{tmp_path / 'store'}" if backend_name == "local" else request.getfixturevalue("s3_store_url")
    store, keys = open_store(url), JobKeys("race")
    store.prepare()
    g1 = ObjectRef(key=keys.global_model(2), sha256="1" * 64)
    r1 = Result(job="race", round=1, dag_run_id="first", input_global=ObjectRef(key="k", sha256="0" * 64),
                strategy={"name": "FedAvg"}, new_global=g1)
    commit.commit_round(store, keys, r1, None, None)
    head, version = commit.head_versioned(store, keys)
    barrier, outcomes = threading.Barrier(8), {}

    def writer(i: int) -> None:
        result = r1.model_copy(update={
            "round": 2, "dag_run_id": f"run-{i}", "input_global": g1,
            "new_global": ObjectRef(key=keys.global_model(3), sha256=f"{i}" * 64),
        })
        barrier.wait()
        try:
            commit.commit_round(store, keys, result, head, version)
            outcomes[i] = "won"
        except commit.RoundCommittedElsewhere as exc:
            outcomes[i] = exc.winner

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcomes.items() if o == "won"]
    assert len(winners) == 1
    final = store.get_record(keys.head, Head)
    assert final.round == 2 and final.dag_run_id == f"run-{winners[0]}"
    assert all(o == f"run-{winners[0]}" for i, o in outcomes.items() if i not in winners)
    assert store.get_record(keys.result(2), Result).dag_run_id == final.dag_run_id


def test_stale_input_is_refused_and_roll_forward(tmp_path: Path) -> None:
    store, keys = open_store(f"file://{tmp_path / 'store'}"), JobKeys("stale")
    g = ObjectRef(key=keys.global_model(2), sha256="1" * 64)
    r1 = Result(job="stale", round=1, dag_run_id="a", input_global=ObjectRef(key="k", sha256="0" * 64),
                strategy={"name": "FedAvg"}, new_global=g)
    # a crash between result.json and HEAD: the next writer finishes that commit
    store.create_record(keys.result(1), r1)
    assert commit.roll_forward(store, keys, print).round == 1
    head = store.get_record(keys.head, Head)
    plan = Plan.model_construct(job="stale", round=2, dag_run_id="b",
                                input_global=ObjectRef(key="other", sha256="9" * 64))
    with pytest.raises(commit.StaleInput, match="not the previous round's committed output"):
        commit.check_input(plan, head, "b")
    with pytest.raises(commit.RoundCommittedElsewhere, match="planned by run b"):
        commit.check_input(plan, head, "c")
