"""Both step launchers commit the same globals: a seeded example job, 2 rounds, warm vs plain subprocess.

The rounds' steps run through the local runner itself (``LocalStepOperator.execute``, what each
Airflow task runs) with ``AIRFED_STEP_LAUNCHER=warm`` and ``=subprocess``, each path against its own
store and MLflow, at the same thread settings (the embedded default's ``OMP_NUM_THREADS``). Only the
steps that make a global run (distribute, train per silo, aggregate); validate, evaluate and
register read it. Every round's committed global must be the same bytes (sha256) on both paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import REPO, small_example_spec, stop_warm_servers
from recorded_operator import RecordedStepOperator

ROUNDS = 2


def run_rounds(spec_path: Path, home: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """ROUNDS rounds of the job on launcher ``kind``; each round's committed result record."""
    from airfed.dag.step_calls import RoundRefs, round_calls
    from airfed.spec import load_spec

    from fl_tasks import prepare_data
    from fl_tasks.store import JobKeys, open_store

    with monkeypatch.context() as patch:
        patch.setenv("AIRFED_HOME", str(home))
        patch.setenv("AIRFED_STORE_URL", f"file://{home / 'store'}")
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        patch.setenv("AIRFED_STEP_LAUNCHER", kind)
        patch.setenv("PYTHONPATH", str(REPO))
        spec = load_spec(spec_path)
        assert prepare_data.main([spec.step_payload()]) == 0  # the silos' data (seeded), not under test

        def execute(call) -> dict:
            task = RecordedStepOperator(task_id=f"{call.step}-{call.silo or 'server'}", step=call.step, argv=call.argv,
                         env=call.env, silo=call.silo)
            result = task.execute({})
            assert task.log.messages[0].endswith(f"({kind})"), task.log.messages[0]
            return result

        results = []
        for r in range(1, ROUNDS + 1):
            run_id = f"launcher-paths-{r}"  # the same ids on both paths: nothing differs but the launcher
            refs = RoundRefs(round="{round}", run_id=run_id, chain_id="launcher-paths-1",
                             training=json.dumps(spec.training))
            planned = execute(round_calls(spec, refs)["distribute"])["round"]
            assert planned == r
            calls = round_calls(spec, RoundRefs(str(r), refs.run_id, refs.chain_id, refs.training))
            for call in calls["train"]:
                execute(call)
            execute(calls["aggregate"])
            results.append(open_store().get_json(JobKeys(spec.job).result(r)))
        return results


def warm_requests(warm_dir: Path) -> int:
    """Steps forked so far by the warm servers in ``warm_dir``."""
    from fl_tasks.warm.launch import request_op
    from fl_tasks.warm.protocol import socket_paths

    pings = [request_op(p, "ping") for p in socket_paths(warm_dir)]
    return sum(p["requests"] for p in pings if p)


def test_warm_and_subprocess_paths_commit_the_same_globals(tmp_path, monkeypatch):
    spec = small_example_spec(tmp_path / "spec", silos=("us", "eu"), epochs=1)
    warm_dir = tmp_path / "warm-servers"  # its own: the session's servers also serve other workers' tests
    monkeypatch.setenv("AIRFED_WARM_DIR", str(warm_dir))
    try:
        warm = run_rounds(spec, tmp_path / "warm", "warm", monkeypatch)
        assert warm_requests(warm_dir) == ROUNDS * 4  # every step forked warm (no fallback to a subprocess)
        cold = run_rounds(spec, tmp_path / "subprocess", "subprocess", monkeypatch)
        assert warm_requests(warm_dir) == ROUNDS * 4  # and none on the subprocess path
    finally:
        stop_warm_servers(warm_dir)

    shas = {kind: [(r["input_global"]["sha256"], r["new_global"]["sha256"]) for r in results]
            for kind, results in (("warm", warm), ("subprocess", cold))}
    print(json.dumps({**shas, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}))
    for results in (warm, cold):
        assert all(r["committed"] and sorted(r["accepted"]) == ["eu", "us"] for r in results)
        # the rounds trained: each round's global is new, and the next round starts from it
        assert results[0]["new_global"] == results[1]["input_global"]
        assert len({results[0]["input_global"]["sha256"], *(r["new_global"]["sha256"] for r in results)}) == 3
    assert shas["warm"] == shas["subprocess"]
    # the silos' updates too, byte for byte
    assert [{s: a["sha256"] for s, a in r["accepted"].items()} for r in warm] == \
        [{s: a["sha256"] for s, a in r["accepted"].items()} for r in cold]
