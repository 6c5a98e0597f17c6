"""Fault injection through real DAG runs (``airfed run`` → Airflow's dag.test(), in the test process:
``helpers.airfed_in_process``; the command's own process is under test in test_run.py).

Misbehaving silos come from tests/fixtures/airfed_faults.py, selected per silo by node_config
(specs from ``helpers.make_fault_spec``). What each step does with a fault (every rejection reason,
differential privacy, sampling) is tested round by round in-process in
tests/fl_tasks/test_round_faults.py; here, what the DAG and ``airfed run`` add: a failed or skipped
silo task does not stop the round, a round without quorum fails the run and leaves HEAD and the
champion alone, and a crashed commit is finished by the next run.
"""

from __future__ import annotations

import os

from helpers import make_fault_spec, mlflow_round_runs, prepare_in_process, round_in_process, store_json
from helpers import run_fault_spec as airfed_run

from fl_tasks.steps.distribute import sample_silos
from fl_tasks.warm import SubprocessLauncher, run


def test_sampled_round_then_quorum_failure_keeps_head_and_champion_then_resumes(tmp_path, airflow_db):
    """Round 1 samples 2 of 4 silos (the others' tasks skip); round 2 loses its quorum (two silos
    raise: the run fails, nothing moves); round 3 (round 2 again) commits without its failed silo."""
    home = tmp_path / "home"
    sampled = make_fault_spec(tmp_path, "sampled", {"a": "", "b": "", "c": "", "d": ""},
                              strategy={"name": "FedAvg", "fraction_train": 0.5, "sample_seed": 3})
    bad = make_fault_spec(tmp_path, "bad", {"a": "", "b": "raise", "c": "raise"})
    one_down = make_fault_spec(tmp_path, "one-down", {"a": "", "b": "", "c": "raise"})

    environ = dict(os.environ)
    proc, first = airfed_run(home, sampled)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert dict(os.environ) == environ  # the in-process run left nothing behind (AIRFED_SPECS hid other DAGs)
    head_before = store_json(home, "faulty/HEAD.json")
    assert head_before["round"] == 1
    expected = sample_silos(["a", "b", "c", "d"], 0.5, seed=3, job="faulty", r=1, at_least=2)
    assert store_json(home, "faulty/rounds/1/plan.json")["sampled"] == expected
    assert first["rounds"][0]["accepted"] == sorted(expected) and first["rounds"][0]["rejected"] == {}
    for silo in {"a", "b", "c", "d"} - set(expected):  # skipped, and still evaluated
        assert store_json(home, f"faulty/rounds/1/updates/{silo}.json") is None
        assert store_json(home, f"faulty/rounds/1/evaluation/{silo}.json") is not None

    proc, failed = airfed_run(home, bad)
    assert proc.returncode == 1
    assert failed["state"] == "failed" and failed["rounds"] == []
    assert store_json(home, "faulty/HEAD.json") == head_before
    result = store_json(home, "faulty/rounds/2/result.json")
    assert result["committed"] is False and "quorum needs 2" in result["reason"]
    assert "simulated silo failure" in result["rejected"]["b"]
    client, runs = mlflow_round_runs(home)
    failed_run = next(r for r in runs if r.data.tags["airfed.round"] == "2")
    assert failed_run.info.status == "FAILED" and "quorum needs 2" in failed_run.data.tags["airfed.failure"]
    assert str(client.get_model_version_by_alias("faulty", "champion").version) == "1"
    assert len(client.search_model_versions("name = 'faulty'")) == 1

    proc, resumed = airfed_run(home, one_down)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["round"] for r in resumed["rounds"]] == [2]
    assert resumed["rounds"][0]["accepted"] == ["a", "b"]
    assert "simulated silo failure" in resumed["rounds"][0]["rejected"]["c"]
    assert store_json(home, "faulty/HEAD.json")["round"] == 2


def test_aggregator_killed_before_head_is_finished_by_the_next_run(tmp_path, monkeypatch, airflow_db):
    """result.json is the commit point; a crash before HEAD moved is finished (rolled forward) by the
    next writer instead of being redone, and its registry version is backfilled."""
    home = tmp_path / "home"
    spec_path = make_fault_spec(tmp_path, "crash", {"a": "", "b": ""})
    crashed = {"dag_run_id": "manual__crashed"}
    with monkeypatch.context() as patch:  # round 1 step by step; its aggregate dies like a killed pod
        patch.setenv("AIRFED_HOME", str(home))
        patch.setenv("AIRFED_STORE_URL", f"file://{home / 'store'}")
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        spec = prepare_in_process(spec_path, patch)
        steps = round_in_process(spec, crashed["dag_run_id"], 1, patch, steps=("distribute", "train", "validate"))
        assert set(steps.values()) == {0}, steps
        from airfed.dag.step_calls import RoundRefs, round_calls

        call = round_calls(spec, RoundRefs("1", crashed["dag_run_id"], crashed["dag_run_id"], "{}"))["aggregate"]
        lines: list[str] = []
        env = {**os.environ, **call.env, "AIRFED_FAULT_INJECT": "aggregate:before-head"}
        assert run(SubprocessLauncher(), call.argv, env, on_line=lines.append) == 137, lines
    assert "[airfed] fault injection: crashing at aggregate:before-head" in lines
    assert store_json(home, "faulty/HEAD.json") is None
    orphan = store_json(home, "faulty/rounds/1/result.json")
    assert orphan["committed"] is True and orphan["dag_run_id"] == crashed["dag_run_id"]

    proc, rerun = airfed_run(home, spec_path)
    head = store_json(home, "faulty/HEAD.json")
    plan2 = store_json(home, "faulty/rounds/2/plan.json")
    assert head["round"] == 2 and head["dag_run_id"] == plan2["dag_run_id"] != crashed["dag_run_id"]
    assert plan2["input_global"] == orphan["new_global"]  # round 2 trained from the finished round 1
    client, _runs = mlflow_round_runs(home)
    versions = {v.tags["round"]: v for v in client.search_model_versions("name = 'faulty'")}
    assert sorted(versions) == ["1", "2"]
    assert versions["1"].tags["global_sha256"] == orphan["new_global"]["sha256"]
    assert versions["1"].tags["dag_run_id"] == crashed["dag_run_id"]
    assert versions["1"].tags["evaluated"] == "false"  # its run stopped before evaluate: never champion
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["round"] for r in rerun["rounds"]] == [2]  # only the rounds this run committed
    assert rerun["committed_by_others"] == {"1": crashed["dag_run_id"]} and rerun["lost"] is None
    assert f"round(s) 1 committed meanwhile by another run: {crashed['dag_run_id']}" in proc.stdout
