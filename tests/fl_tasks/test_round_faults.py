"""Misbehaving silos, differential privacy, client sampling and a crashed aggregator, round by round in-process.

Each round runs every step's StepCall (argv + env, from the DAG builder's ``round_calls``) through
``python -m fl_tasks``'s entry point in this process against a local store and a SQLite MLflow, in
DAG order, no Airflow (``helpers.round_in_process``); the misbehaving ClientApp is
tests/fixtures/airfed_faults.py, its faults chosen per silo by node_config. What the DAG adds on top
(failed and skipped tasks not stopping the round, ``airfed run``'s summary and exit code) is run
for real in tests/e2e/test_faults.py.
"""

from __future__ import annotations

import json

import pytest
from helpers import make_fault_spec, mlflow_round_runs, prepare_in_process, round_in_process, store_json

from fl_tasks.steps.distribute import sample_silos


def test_every_bad_update_is_rejected_with_its_reason(airfed_home, tmp_path, monkeypatch):
    spec = prepare_in_process(make_fault_spec(tmp_path, "faults", {
        "ok1": "", "ok2": "", "raise": "raise", "hang": "hang", "nan": "nan",
        "shape": "shape", "norm": "norm", "tamper": "tamper", "examples": "examples",
    }), monkeypatch)
    # the spec's silo timeout (20 s) for every step but the hanging silo's train: 1 s
    outcomes = round_in_process(spec, "manual__faults", 1, monkeypatch,
                                extra_env={("train", "hang"): {"AIRFED_STEP_TIMEOUT": "1"}})
    # the task fails, naming the handler and the user code's exception...
    assert str(outcomes[("train", "raise")]) == "the train handler raised RuntimeError: simulated silo failure"
    assert "timed out after 1s" in str(outcomes[("train", "hang")])
    assert outcomes[("aggregate", None)] == 0 and outcomes[("register", None)] == 0  # ...the round goes on

    result = store_json(airfed_home, "faulty/rounds/1/result.json")
    assert sorted(result["accepted"]) == ["ok1", "ok2"]
    reasons = result["rejected"]
    assert set(reasons) == {"raise", "hang", "nan", "shape", "norm", "tamper", "examples"}
    assert "train failed: the train handler raised RuntimeError: simulated silo failure" in reasons["raise"]
    assert "train timed out: timed out after 1s" in reasons["hang"]
    assert "non-finite" in reasons["nan"]
    assert "is torch.float32" in reasons["shape"] or "shape" in reasons["shape"] or "F32" in reasons["shape"]
    assert "exceeds guards.max_update_norm=100.0" in reasons["norm"]
    assert "checksum mismatch for" in reasons["tamper"] and "updates/tamper.safetensors" in reasons["tamper"]
    assert "num-examples must be a positive integer" in reasons["examples"]

    _client, runs = mlflow_round_runs(airfed_home)
    (round_run,) = runs
    assert round_run.data.metrics["accepted"] == 2 and round_run.data.metrics["rejected"] == 7
    assert "simulated silo failure" in round_run.data.tags["rejected.raise"]
    assert "checksum mismatch" in round_run.data.tags["rejected.tamper"]


@pytest.mark.parametrize("mode", ["server", "client"])
def test_differential_privacy_is_applied_and_recorded(airfed_home, tmp_path, monkeypatch, mode):
    dp = {"mode": mode, "noise_multiplier": 0.01, "clipping_norm": 0.5}
    spec = prepare_in_process(
        make_fault_spec(tmp_path, f"dp-{mode}", {"a": "", "b": ""}, differential_privacy=dp), monkeypatch
    )
    outcomes = round_in_process(spec, f"manual__dp_{mode}", 1, monkeypatch,
                                steps=("distribute", "train", "aggregate", "evaluate", "register"))
    assert set(outcomes.values()) == {0}, outcomes
    result = store_json(airfed_home, "faulty/rounds/1/result.json")
    assert result["committed"] and result["differential_privacy"] == dp
    _client, (run_,) = mlflow_round_runs(airfed_home)
    assert json.loads(run_.data.params["differential_privacy"]) == dp
    norms = [a["update_norm"] for a in result["accepted"].values()]
    if mode == "server":
        assert all(n > 0.5 for n in norms), norms  # clipped server-side, after the guard measured it
    else:
        assert all(n <= 0.5 + 1e-4 for n in norms), norms  # clipped by the silo before it was stored


def test_sample_is_seeded_recorded_and_at_least_the_quorum():
    names = ["a", "b", "c", "d", "e", "f"]
    first = sample_silos(names, 0.5, seed=7, job="j", r=1, at_least=1)
    assert len(first) == 3 and first == sample_silos(names, 0.5, seed=7, job="j", r=1, at_least=1)
    rounds = {tuple(sample_silos(names, 0.5, seed=7, job="j", r=r, at_least=1)) for r in range(1, 20)}
    assert len(rounds) > 1  # a new sample each round
    assert len(sample_silos(names, 0.1, seed=7, job="j", r=1, at_least=4)) == 4
    assert sample_silos(names, 1.0, seed=7, job="j", r=1, at_least=1) == names


def test_unsampled_silos_skip_training_and_the_round_commits(airfed_home, tmp_path, monkeypatch):
    spec = prepare_in_process(make_fault_spec(
        tmp_path, "sampled", {"a": "", "b": "", "c": "", "d": ""},
        strategy={"name": "FedAvg", "fraction_train": 0.5, "sample_seed": 3},
    ), monkeypatch)
    outcomes = round_in_process(spec, "manual__sampled", 1, monkeypatch)
    plan = store_json(airfed_home, "faulty/rounds/1/plan.json")
    expected = sample_silos(["a", "b", "c", "d"], 0.5, seed=3, job="faulty", r=1, at_least=2)
    assert plan["sampled"] == expected and plan["sampling"] == {"fraction_train": 0.5, "seed": 3}
    result = store_json(airfed_home, "faulty/rounds/1/result.json")
    assert sorted(result["accepted"]) == sorted(expected) and result["rejected"] == {}
    for silo in {"a", "b", "c", "d"} - set(expected):
        assert outcomes[("train", silo)] == outcomes[("validate", silo)] == 99  # the task is skipped
        assert store_json(airfed_home, f"faulty/rounds/1/updates/{silo}.json") is None
        # federated evaluation still covers every silo
        assert store_json(airfed_home, f"faulty/rounds/1/evaluation/{silo}.json") is not None
    assert {outcomes[("train", s)] for s in expected} == {0}

