"""Two ``airfed run`` processes of one job at once, sharing the store and MLflow (separate Airflow homes).

Whatever the interleaving, a round number commits once: each committed round has one result and one
registry version whose ``global_sha256`` is the store's, every round trains from the previous
round's committed global, each run's summary lists only the rounds it committed, every round trains
with its own run's config, and a run that lost a race exits non-zero naming the winner. The example
job cut to 2 silos and 1 local epoch: the runs only have to meet.
"""

from __future__ import annotations

import subprocess
import sys
import time

from helpers import REPO, clean_env, json_summary, small_example_spec

from fl_tasks.records import Plan, RegistrySummary, Result
from fl_tasks.store import JobKeys, open_store

ROUNDS = 2


def start_run(spec, home, shared: dict[str, str], training: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "airfed.cli", "run", str(spec), "--rounds", str(ROUNDS), "--json",
         "--training", training],
        cwd=REPO, env=clean_env(home, **shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_concurrent_runs_commit_each_round_once(tmp_path):
    shared = {
        "AIRFED_STORE_URL": f"file://{tmp_path / 'store'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    configs = {"a": '{"lr": 0.05}', "b": '{"lr": 0.1}'}
    spec = small_example_spec(tmp_path / "spec")
    first = start_run(spec, tmp_path / "home-a", shared, configs["a"])
    time.sleep(2)
    second = start_run(spec, tmp_path / "home-b", shared, configs["b"])
    outputs = {name: proc.communicate(timeout=1500) for name, proc in (("a", first), ("b", second))}
    procs = {"a": first, "b": second}
    summaries = {name: json_summary(subprocess.CompletedProcess([], procs[name].returncode, *outputs[name]))
                 for name in procs}
    for name, summary in summaries.items():
        assert summary is not None, outputs[name][0][-3000:] + outputs[name][1][-3000:]

    store = open_store(shared["AIRFED_STORE_URL"])
    keys = JobKeys("digits")
    head = store.get_json(keys.head)
    committed = list(range(1, head["round"] + 1))
    rounds_of = {name: [r["round"] for r in s["rounds"]] for name, s in summaries.items()}
    # each run lists only its own rounds; together they are every committed round, once
    assert sorted(rounds_of["a"] + rounds_of["b"]) == committed, rounds_of
    runs_of = {name: set(s["dag_run_ids"]) for name, s in summaries.items()}

    previous_global = None
    for r in committed:
        result = store.get_record(keys.result(r), Result)
        plan = store.get_record(keys.plan(r), Plan)
        assert result.committed and result.dag_run_id == plan.dag_run_id
        if previous_global is not None:  # trained from the previous round's committed output
            assert plan.input_global == previous_global, f"round {r} did not train from round {r - 1}'s global"
        previous_global = result.new_global
        owner = next(name for name in runs_of if result.dag_run_id in runs_of[name])
        assert r in rounds_of[owner]
        lr = {"a": 0.05, "b": 0.1}[owner]
        assert plan.training["lr"] == lr, f"round {r} trained with another run's config"
        registry = store.get_record(keys.registry(r), RegistrySummary)
        assert registry.dag_run_id == result.dag_run_id

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=shared["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name = 'digits-mlp'")
    by_round: dict[str, list] = {}
    for v in versions:
        by_round.setdefault(v.tags["round"], []).append(v)
    assert sorted(int(r) for r in by_round) == committed
    for r, vs in by_round.items():
        assert len(vs) == 1, f"round {r} has {len(vs)} registry versions"
        assert vs[0].tags["global_sha256"] == store.get_record(keys.result(int(r)), Result).new_global.sha256

    # a run that stopped early lost a race and says to whom; a run that did all its rounds exits 0
    for name, summary in summaries.items():
        proc, out = procs[name], outputs[name][0]
        if len(rounds_of[name]) == ROUNDS:
            assert proc.returncode == 0, out[-3000:]
        else:
            assert proc.returncode != 0
            lost = summary["lost"]
            other = "b" if name == "a" else "a"
            assert lost is not None and lost["winner"] in runs_of[other], summary
            assert f"lost to run {lost['winner']}" in out
    assert any(len(rounds) < ROUNDS for rounds in rounds_of.values()) or len(committed) == 2 * ROUNDS

    verify = subprocess.run(
        [sys.executable, "-m", "airfed.cli", "verify", str(spec), "--all"], cwd=REPO,
        env=clean_env(tmp_path / "home-a", **shared), capture_output=True, text=True, timeout=600,
    )
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]
