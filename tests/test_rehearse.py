"""The deployed form, rehearsed: ``images/rehearse.py`` (what ``make rehearse`` runs) under pytest.

The Airflow and fl-task environments are built by ``images/install_env.py`` as the Dockerfiles build
them (cached under ``.rehearse/``, so a later ``make rehearse`` reuses them), smoke-tested apart, then
and their pieces checked here. The deployment itself (moto's S3, an MLflow server, Airflow's API
server, scheduler and DAG processor on loopback) runs the digits job in tests/test_rehearse_faults.py:
2 rounds checked as ``make rehearse`` checks them (``rehearse.run_and_verify``), then 2 rounds under
faults, on one deployment (starting every server once: ~30 s of CPU less than a deployment each).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "images"))
import install_env  # noqa: E402
import rehearse  # noqa: E402

#: one set of environments for the module: keep its tests on one xdist worker, in file order
#: the deployed form: `make test` and `make test-deployed` run it, `make test-quick` leaves it out
pytestmark = pytest.mark.deployed


@pytest.fixture(scope="module")
def envs() -> dict[str, rehearse.Env]:
    return rehearse.build_envs()


@pytest.fixture
def deployment(envs, tmp_path) -> rehearse.Deployment:
    deployment = rehearse.Deployment(tmp_path / "home", envs, sys.executable)
    deployment.stage()
    return deployment


def test_the_airflow_environment_holds_no_step_packages(envs):
    present = set(install_env.installed(envs["airflow"].python))
    assert {"apache-airflow", "apache-airflow-providers-cncf-kubernetes", "airfed", "minio", "pydantic"} <= present
    assert not present & {"torch", "flwr", "mlflow", "mlflow-skinny"}, present


def test_the_step_environment_holds_no_airflow(envs):
    present = set(install_env.installed(envs["steps"].python))
    assert {"torch", "flwr", "mlflow-skinny", "minio", "safetensors", "matplotlib", "airfed"} <= present
    assert not [name for name in present if name.startswith("apache-airflow")], present
    assert "mlflow" not in present  # the client only: the tracking server is its own deployment


def test_environments_are_reused_while_their_inputs_are_unchanged(envs, tmp_path):
    for env in envs.values():
        assert (env.root / ".complete").exists() and env.root.name.endswith(rehearse.inputs_hash(env.side))
    project = tmp_path / "project"
    for name in ("pyproject.toml", "constraints.txt", "images/install_env.py"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, project / name)
    assert rehearse.inputs_hash("steps", project) == rehearse.inputs_hash("steps")
    assert rehearse.inputs_hash("steps") != rehearse.inputs_hash("airflow")
    with open(project / "constraints.txt", "a") as fh:
        fh.write("tomli==2.5.0\n")
    assert rehearse.inputs_hash("steps", project) != rehearse.inputs_hash("steps")


def test_airfed_is_reinstalled_only_when_its_sources_change(tmp_path):
    """What lets tests/test_rehearse_faults.py reuse these environments without a second install."""
    project = tmp_path / "project"
    project.mkdir()
    for name in rehearse.PROJECT_SOURCES:
        copy = shutil.copy if (REPO / name).is_file() else shutil.copytree
        copy(REPO / name, project / name)
    before = rehearse.sources_hash(project)
    (project / "fl_tasks" / "__pycache__").mkdir(exist_ok=True)
    (project / "fl_tasks" / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    assert rehearse.sources_hash(project) == before
    with open(project / "fl_tasks" / "commit.py", "a") as fh:
        fh.write("# changed\n")
    assert rehearse.sources_hash(project) != before


def test_each_environment_smoke_tests(deployment):
    """Every ``python -m fl_tasks <step> --help`` in the step env; the plugin entry points, the DAG loader
    (a DagBag of the staged dags/) and ``airfed render --runner kubernetes`` in the Airflow env."""
    done = deployment.smoke()
    assert done[0] == "6 step CLIs" and "airfed" in done[1] and "digits" in done[2], done


def test_stop_all_stops_every_marked_process_also_outside_the_process_groups(deployment):
    env = deployment.tools_env()
    server = deployment.start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                     "-p", str(deployment.s3_port)], env)
    # like a step subprocess of the local runner: its own session, found by the marker in its environment
    stray = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); time.sleep(600)"], env=env, start_new_session=True)
    try:
        rehearse.wait_for("the S3 server", lambda: rehearse.http("GET", f"{deployment.s3.endpoint}/")[0] == 200,
                          [server], 60)
        deadline = time.monotonic() + 10
        while len(rehearse.marked_processes(deployment.marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = rehearse.stop_all(deployment.services, deployment.marker, timeout=10)
        assert any(str(stray.pid) in k for k in killed), killed
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert not server.alive() and not rehearse.marked_processes(deployment.marker)
    finally:
        if stray.poll() is None:
            os.kill(stray.pid, signal.SIGKILL)
