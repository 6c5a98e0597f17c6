"""End to end: ``airfed run dags/digits.yaml`` through Airflow's dag.test(), real torch, real MLflow.

One fresh AIRFED_HOME: a first run of 3 rounds (the example is past 0.9 val accuracy by then), then a
second run of 2 that must continue at round 4.
Each round is one DAG run (``dag.test()``); the rounds of one invocation share one MLflow parent run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXAMPLE_SPEC, REPO, airfed_cli, airflow_runs, clean_env, json_summary

FIRST, SECOND = 3, 2
TOTAL = FIRST + SECOND


def airfed_run(home: Path, *args: str) -> tuple[dict, str]:
    proc = airfed_cli(home, "run", str(EXAMPLE_SPEC), "--json", *args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json_summary(proc), proc.stdout


def referenced_objects(store_root: Path):
    """Every (key, sha256) pair recorded in the store's JSON records."""
    for record_path in store_root.rglob("*.json"):
        record = json.loads(record_path.read_text())
        stack = [record]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("key"), str) and isinstance(node.get("sha256"), str):
                    yield record_path, node["key"], node["sha256"]
                if "global_key" in node and "global_sha256" in node:
                    yield record_path, node["global_key"], node["global_sha256"]
                if "result_key" in node and "result_sha256" in node:
                    yield record_path, node["result_key"], node["result_sha256"]
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e") / "home"
    first, first_out = airfed_run(home, "--rounds", str(FIRST))
    second, second_out = airfed_run(home, "--rounds", str(SECOND))
    return home, first, first_out, second, second_out


def test_first_run_trains_its_rounds_and_converges(runs):
    _home, first, out, _second, _ = runs
    assert first["state"] == "success"
    assert [r["round"] for r in first["rounds"]] == list(range(1, FIRST + 1))
    accuracies = [r["metrics"]["accuracy"] for r in first["rounds"]]
    assert accuracies[-1] >= 0.85, accuracies
    assert accuracies[-1] > accuracies[0]
    assert all(sorted(r["accepted"]) == ["asia", "eu", "us"] for r in first["rounds"])
    assert first["head_round"] == FIRST and first["registry_version"] == FIRST
    # one DAG run per round, the first run's id names the chain
    assert len(set(first["dag_run_ids"])) == FIRST and first["dag_run_id"] == first["dag_run_ids"][0]
    assert [r["dag_run_id"] for r in first["rounds"]] == first["dag_run_ids"]
    # one progress line per round, then where to look
    progress = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(progress) == FIRST and "val accuracy" in progress[0]
    assert "mlflow:" in out and "registry:" in out and "store:" in out


def test_second_run_continues_from_head(runs):
    _home, first, _, second, _ = runs
    assert [r["round"] for r in second["rounds"]] == list(range(FIRST + 1, TOTAL + 1))
    assert second["head_round"] == TOTAL
    assert second["rounds"][0]["metrics"]["accuracy"] >= first["rounds"][-1]["metrics"]["accuracy"] - 0.05
    assert second["mlflow_run_id"] != first["mlflow_run_id"]


def test_every_dag_run_is_one_finished_round_and_none_is_left_queued(runs):
    home, first, _, second, _ = runs
    dag_runs = airflow_runs(home, "digits")
    assert [r[0] for r in dag_runs] == first["dag_run_ids"] + second["dag_run_ids"]
    assert {r[2] for r in dag_runs} == {"success"}  # nothing queued or running: next_round skipped (rounds=1)
    rounds = home / "store" / "digits" / "rounds"
    plans = [json.loads((rounds / str(r) / "plan.json").read_text()) for r in range(1, TOTAL + 1)]
    assert [p["dag_run_id"] for p in plans] == first["dag_run_ids"] + second["dag_run_ids"]
    assert {p["chain_id"] for p in plans[:FIRST]} == {first["dag_run_id"]}
    assert {p["chain_id"] for p in plans[FIRST:]} == {second["dag_run_id"]}
    # the steps' extra links ask for the round's register result only from register itself: no
    # "XCom not found" errors in the log for the steps that run before it
    missing = [line for log in (home / "logs").glob("run-*.log") for line in log.read_text().splitlines()
               if "XCom not found" in line]
    assert not [line for line in missing if "for task 'register'" in line], missing[:3]


def test_every_recorded_sha256_matches_its_object(runs):
    home, *_ = runs
    store = home / "store"
    checked = 0
    for record, key, sha in referenced_objects(store):
        data = (store / key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, f"{key} (referenced by {record})"
        checked += 1
    assert checked > TOTAL * 3 * 2  # globals, updates, results across every round
    assert json.loads((store / "digits" / "HEAD.json").read_text())["round"] == TOTAL


def test_mlflow_lineage_and_registry(runs):
    from mlflow import MlflowClient

    home, first, _, second, _ = runs
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("airfed/digits")
    assert exp is not None
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["airfed.dag_run_id"] == first["dag_run_id"]
    nested = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(int(r.data.tags["airfed.round"]) for r in nested) == list(range(1, FIRST + 1))
    last = next(r for r in nested if r.data.tags["airfed.round"] == str(FIRST))
    for silo in ("us", "eu", "asia"):
        assert f"{silo}.train_loss" in last.data.metrics
        assert f"{silo}.eval_accuracy" in last.data.metrics
        assert len(last.data.tags[f"update_sha256.{silo}"]) == 64
    assert last.data.metrics["accepted"] == 3 and last.data.metrics["rejected"] == 0
    assert len(last.data.params["new_global_sha256"]) == 64

    versions = client.search_model_versions("name = 'digits-mlp'")
    assert sorted(int(v.version) for v in versions) == list(range(1, TOTAL + 1))
    version = next(v for v in versions if str(v.version) == str(FIRST))
    for tag in ("job", "round", "dag_run_id", "spec_hash", "global_sha256", "update_sha256.us"):
        assert version.tags.get(tag), tag
    assert version.tags["round"] == str(FIRST) and version.tags["dag_run_id"] == first["rounds"][-1]["dag_run_id"]
    champion = client.get_model_version_by_alias("digits-mlp", "champion")
    assert int(champion.version) == second["champion_version"]
    best = max(versions, key=lambda v: float(v.tags["promotion_value"]))
    assert champion.version == best.version


CONSUMER_RUN = """
import json, sys
from pathlib import Path
from airfed.environment import configure
configure(dags_folder=Path("dags"))
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder="dags")
digits, consumer = bag.dags["digits"], bag.dags["digits_batch_predict"]
(outlet,) = digits.get_task("model_event").outlets
assert outlet in consumer.timetable.asset_condition.objects, "not scheduled on the job's model Asset"
run = consumer.test()
print("RESULT " + json.dumps({"state": str(run.state),
                              "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()}}))
"""


def test_asset_consumer_dag_reads_the_event_and_predicts_only_when_the_champion_moved(runs):
    """The example DAG scheduled on the job's model Asset, run (dag.test) against the runs' own Airflow
    DB: its newest model event says whether the champion moved and which global to score with."""
    import sqlite3

    home, _first, _, second, _ = runs
    db = sqlite3.connect(home / "airflow" / "airflow.db")
    try:
        (extra,) = db.execute("SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                              "WHERE a.name = 'airfed.digits.model' ORDER BY e.id DESC LIMIT 1").fetchone()
    finally:
        db.close()
    event = json.loads(extra)
    record = json.loads((home / "store" / "digits" / "rounds" / str(TOTAL) / "registry.json").read_text())
    assert (event["round"], event["version"], event["champion_moved"]) == (TOTAL, TOTAL, record["promoted"])
    assert event["metrics"] == record["metrics"] and event["champion_version"] == second["champion_version"]
    proc = subprocess.run([sys.executable, "-c", CONSUMER_RUN], capture_output=True, text=True, cwd=REPO,
                          env=clean_env(home), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    predictions = home / "predictions" / "digits-mlp" / f"v{TOTAL}.csv"
    if event["champion_moved"]:
        assert result["tasks"] == {"champion_moved": "success", "predict": "success"}
        assert len(predictions.read_text().splitlines()) == 1798  # scored with that version's weights
    else:
        assert result["tasks"] == {"champion_moved": "success", "predict": "skipped"}
        assert not predictions.exists()


def test_convergence_plot_written_next_to_summary(runs):
    home, first, out, second, _ = runs
    plot = Path(second["convergence_plot"])
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (home / "reports" / "digits" / "summary.json").exists()
    assert "plot:" in out
