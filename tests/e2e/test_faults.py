"""Fault injection through real DAG runs (``airfed run`` → Airflow's dag.test()).

Misbehaving silos come from tests/fixtures/airfed_faults.py, selected per silo by node_config
(specs from ``helpers.make_fault_spec``).
"""

from __future__ import annotations

import json

import pytest
from helpers import make_fault_spec, mlflow_round_runs, store_json
from helpers import run_fault_spec as airfed_run


def test_every_bad_update_is_rejected_with_its_reason(tmp_path):
    home = tmp_path / "home"
    spec = make_fault_spec(tmp_path, "faults", {
        "ok1": "", "ok2": "", "raise": "raise", "hang": "hang", "nan": "nan",
        "shape": "shape", "norm": "norm", "tamper": "tamper", "examples": "examples",
    })
    proc, summary = airfed_run(home, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["rounds"][0]["accepted"] == ["ok1", "ok2"]

    result = store_json(home, "faulty/rounds/1/result.json")
    assert sorted(result["accepted"]) == ["ok1", "ok2"]
    reasons = result["rejected"]
    assert "train failed: RuntimeError: simulated silo failure" in reasons["raise"]
    assert "train timed out: timed out after 20s" in reasons["hang"]
    assert "non-finite" in reasons["nan"]
    assert "is torch.float32" in reasons["shape"] or "shape" in reasons["shape"] or "F32" in reasons["shape"]
    assert "exceeds guards.max_update_norm=100.0" in reasons["norm"]
    assert "checksum mismatch for" in reasons["tamper"] and "updates/tamper.safetensors" in reasons["tamper"]
    assert "num-examples must be a positive integer" in reasons["examples"]

    _client, runs = mlflow_round_runs(home)
    (round_run,) = runs
    assert round_run.data.metrics["accepted"] == 2 and round_run.data.metrics["rejected"] == 7
    assert "simulated silo failure" in round_run.data.tags["rejected.raise"]
    assert "checksum mismatch" in round_run.data.tags["rejected.tamper"]


def test_quorum_failure_keeps_head_and_champion_then_resumes(tmp_path):
    home = tmp_path / "home"
    good = make_fault_spec(tmp_path, "good", {"a": "", "b": "", "c": ""})
    bad = make_fault_spec(tmp_path, "bad", {"a": "", "b": "raise", "c": "raise"})
    one_down = make_fault_spec(tmp_path, "one-down", {"a": "", "b": "", "c": "raise"})

    proc, first = airfed_run(home, good)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    head_before = store_json(home, "faulty/HEAD.json")
    assert head_before["round"] == 1

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


def test_aggregator_killed_before_head_is_finished_by_the_next_run(tmp_path):
    """result.json is the commit point; a crash before HEAD moved is finished (rolled forward) by the
    next writer instead of being redone, and its registry version is backfilled."""
    home = tmp_path / "home"
    spec = make_fault_spec(tmp_path, "crash", {"a": "", "b": ""})
    proc, crashed = airfed_run(home, spec, extra_env={"AIRFED_FAULT_INJECT": "aggregate:before-head"})
    assert proc.returncode == 1
    assert store_json(home, "faulty/HEAD.json") is None
    orphan = store_json(home, "faulty/rounds/1/result.json")
    assert orphan["committed"] is True and orphan["dag_run_id"] == crashed["dag_run_id"]

    proc, rerun = airfed_run(home, spec)
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


@pytest.mark.parametrize("mode", ["server", "client"])
def test_differential_privacy_is_applied_and_recorded(tmp_path, mode):
    home = tmp_path / "home"
    dp = {"mode": mode, "noise_multiplier": 0.01, "clipping_norm": 0.5}
    spec = make_fault_spec(tmp_path, f"dp-{mode}", {"a": "", "b": ""}, differential_privacy=dp)
    proc, summary = airfed_run(home, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = store_json(home, "faulty/rounds/1/result.json")
    assert result["differential_privacy"] == dp
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("airfed/faulty").experiment_id],
        filter_string="tags.`airfed.kind` = 'round'",
    )
    assert json.loads(run.data.params["differential_privacy"]) == dp
    if mode == "server":
        assert all(a["update_norm"] > 0.5 for a in result["accepted"].values())  # clipped server-side
