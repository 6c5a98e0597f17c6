"""Helpers shared by test modules (importable: ``tests/`` is on ``sys.path`` under pytest).

Paths of the repository, the ``airfed`` CLI in a subprocess with its own AIRFED_HOME, fault-injection
job specs, and reads of the local store and MLflow. Test modules import from here, never from each
other.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
EXAMPLE_SPEC = REPO / "dags" / "digits.yaml"


#: Where the warm step servers of this test process listen (conftest sets it per xdist worker): the
#: CLI runs of many tests, each with its own AIRFED_HOME, share one warm server per step env.
WARM_DIR_ENV = "AIRFED_WARM_DIR"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's env without airfed/MLflow/Airflow settings, with ``AIRFED_HOME=home``.

    The test session's warm-server directory is kept (``AIRFED_WARM_DIR``) unless ``extra`` sets it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_", "MLFLOW_", "AIRFLOW"))}
    if os.environ.get(WARM_DIR_ENV):
        env[WARM_DIR_ENV] = os.environ[WARM_DIR_ENV]
    env.update({"AIRFED_HOME": str(home), **extra})
    return {k: v for k, v in env.items() if v is not None}


def stop_warm_servers(run_dir: Path) -> list[int]:
    """Stop every warm step server listening in ``run_dir``; assert none is left running."""
    from fl_tasks.warm import stop_servers
    from fl_tasks.warm.launch import process_alive

    pids = stop_servers(run_dir, timeout=20)
    assert not [p for p in pids if process_alive(p)], f"warm servers still running: {pids}"
    return pids


def airfed_cli(home: Path, *args: str, env_extra: dict[str, str] | None = None,
               timeout: float = 1200) -> subprocess.CompletedProcess:
    """``python -m airfed.cli ARGS`` from the repository root, on a fresh embedded default under ``home``."""
    return subprocess.run(
        [sys.executable, "-m", "airfed.cli", *args], capture_output=True, text=True, cwd=REPO,
        env=clean_env(home, **(env_extra or {})), timeout=timeout,
    )


@contextlib.contextmanager
def _fds_to(out: Any, err: Any) -> Iterator[None]:
    """Point fds 1/2 (and sys.stdout/stderr) at two files, as a child's would be; restore after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout = open(os.dup(1), "w", buffering=1)  # noqa: SIM115 - closed below
    sys.stderr = open(os.dup(2), "w", buffering=1)  # noqa: SIM115 - closed below
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            stream.close()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def airfed_in_process(home: Path, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``airfed ARGS`` (``airfed.cli.main``) in this test process on a fresh embedded default under
    ``home``; its exit code and output as ``airfed_cli`` returns them.

    For runs whose subject is what the DAG does, not the process: this process has imported Airflow,
    migrated its DB (``airflow_db``) and built the in-process execution API once, ~6 s of CPU that a
    fresh ``airfed run`` pays each time. Airflow's metadata DB is this session's; the store, MLflow,
    logs and data are ``home``'s as in a subprocess. The environment and ``sys.path`` are restored
    after (the command sets AIRFED_SPECS, the DAGs folder, PYTHONPATH, ... for itself).
    """
    from airfed.cli import main

    environ, path = dict(os.environ), list(sys.path)  # the command sets what it needs (AIRFED_SPECS, ...)
    try:
        for name in [k for k in os.environ if k.startswith(("AIRFED_", "MLFLOW_")) and k not in
                     (WARM_DIR_ENV, "AIRFED_TESTS_WARM_DIR")]:
            del os.environ[name]
        os.environ.update({"AIRFED_HOME": str(home), **(env_extra or {})})
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            with _fds_to(out, err):
                try:
                    code = main(list(args))
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                    print(exc.code, file=sys.stderr)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(["airfed", *args], code, out.read(), err.read())
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path


def json_summary(proc: subprocess.CompletedProcess) -> dict[str, Any] | None:
    """The ``--json`` summary (the last line ``airfed run`` prints), or None."""
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None


def make_fault_spec(tmp_path: Path, name: str, silos: dict[str, str], **overrides: Any) -> Path:
    """Job ``faulty`` whose silos misbehave as ``silos[name]`` says (tests/fixtures/airfed_faults.py)."""
    spec = {
        "job": "faulty",
        "client_app": "airfed_faults:app",
        "model": {"init": "examples.digits.model:initial_state"},
        "quorum": {"min_silos": 2},
        "guards": {"max_update_norm": 100.0},
        "training": {"local-epochs": 1, "lr": 0.05, "batch-size": 32},
        "execution": {"silo_timeout_seconds": 20, "retries": 0},
        "data": {"prepare": "examples.digits.data:prepare", "options": {"partition": "iid", "seed": 1}},
        "silos": [
            {
                "name": silo,
                "data": f"${{AIRFED_HOME}}/data/faulty/{silo}.npz",
                "node_config": {"fault": fault, "tamper-key": f"faulty/rounds/{{round}}/updates/{silo}.safetensors"},
            }
            for silo, fault in silos.items()
        ],
        **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_fault_spec(home: Path, spec: Path, *args: str, extra_env: dict[str, str] | None = None):
    """``airfed run SPEC --json --rounds 1`` (in this process) with the fault-injecting ClientApp importable."""
    proc = airfed_in_process(home, "run", str(spec), "--json", "--rounds", "1", *args,
                             env_extra={"PYTHONPATH": str(FIXTURES), **(extra_env or {})})
    return proc, json_summary(proc)


def store_json(home: Path, key: str) -> Any:
    """A JSON record of the local store under ``home``, or None."""
    path = home / "store" / key
    return json.loads(path.read_text()) if path.exists() else None


def mlflow_round_runs(home: Path, experiment: str = "airfed/faulty"):
    """(client, the round runs of ``experiment``) in the SQLite MLflow under ``home``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`airfed.kind` = 'round'")


def airflow_runs(home: Path, dag_id: str) -> list[tuple[str, str, str]]:
    """(run_id, run_type, state) of every DAG run of ``dag_id`` in the embedded metadata DB under ``home``."""
    import sqlite3

    db = sqlite3.connect(home / "airflow" / "airflow.db")
    try:
        return db.execute(
            "SELECT run_id, run_type, state FROM dag_run WHERE dag_id = ? ORDER BY id", (dag_id,)
        ).fetchall()
    finally:
        db.close()


def gone(pid: int, timeout: float = 20.0) -> bool:
    """True once ``pid`` no longer runs (absent or a zombie awaiting its reaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def small_example_spec(directory: Path, silos: tuple[str, ...] = ("us", "eu"), epochs: int = 1,
                       **overrides: Any) -> Path:
    """The example job (dags/digits.yaml) cut down: fewer silos and local epochs, same model and data code.

    For tests where a run only proves an integration: each silo costs a train/validate/evaluate step,
    each epoch the training inside them.
    """
    spec = yaml.safe_load(EXAMPLE_SPEC.read_text())
    spec["silos"] = [s for s in spec["silos"] if s["name"] in silos]
    spec["training"] = {**spec["training"], "local-epochs": epochs}
    spec.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec['job']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


#: A round's steps in DAG order (what the DAG's task dependencies run one after the other).
ROUND_ORDER = ("distribute", "train", "validate", "aggregate", "evaluate", "register")


def round_in_process(spec: Any, run_id: str, r: int, monkeypatch: Any, steps: tuple[str, ...] = ROUND_ORDER,
                     chain_id: str | None = None, training: dict | None = None,
                     extra_env: dict[tuple[str, str | None], dict[str, str]] | None = None,
                     ) -> dict[tuple[str, str | None], Any]:
    """Round ``r`` of ``spec`` with every step's StepCall (argv + env) run in this process, no Airflow.

    Each step runs ``fl_tasks.__main__.main`` on its argv with its env set, as its pod or subprocess
    would, and keeps going whatever a step did (as the DAG's trigger rules do); returns per (step,
    silo) the exit code, or the exception the step raised (its failure is recorded by the step).
    ``extra_env[(step, silo)]`` is added to that one step's env (e.g. a shorter AIRFED_STEP_TIMEOUT).
    """
    from airfed.dag.step_calls import RoundRefs, round_calls

    from fl_tasks.__main__ import main as step_main

    refs = RoundRefs(str(r), run_id, chain_id or run_id, json.dumps({**spec.training, **(training or {})}))
    calls = round_calls(spec, refs)
    outcomes: dict[tuple[str, str | None], Any] = {}
    for step in steps:
        for call in calls[step] if isinstance(calls[step], list) else [calls[step]]:
            with monkeypatch.context() as patch:
                for name, value in {**call.env, **(extra_env or {}).get((step, call.silo), {})}.items():
                    patch.setenv(name, value)
                try:
                    outcome: Any = step_main(call.argv[3:])
                except Exception as exc:  # the task fails; the round goes on
                    outcome = exc
            outcomes[(step, call.silo)] = outcome
    return outcomes


def prepare_in_process(spec_path: Path, monkeypatch: Any) -> Any:
    """Load ``spec_path`` (under the current AIRFED_HOME), create its silos' data; the fault app importable."""
    from airfed.spec import load_spec

    from fl_tasks import prepare_data

    monkeypatch.syspath_prepend(str(FIXTURES))
    spec = load_spec(spec_path)
    assert prepare_data.main([spec.step_payload()]) == 0
    return spec
