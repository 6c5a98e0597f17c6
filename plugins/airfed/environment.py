"""The embedded default: every path and URL under ``AIRFED_HOME`` unless the user set it.

``configure`` must run before Airflow is imported: Airflow reads its configuration at import time.
``migrate_airflow_db`` and ``prepare_silo_data`` are what ``airfed run`` and ``airfed up`` both do
on a fresh AIRFED_HOME.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from fl_tasks.spec import JobSpec
from fl_tasks.store import airfed_home


def configure(dags_folder: Path | None = None) -> dict[str, str]:
    """Set the env for Airflow, the store and MLflow; return what ``airfed`` itself chose."""
    home = airfed_home()
    airflow_home = home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    chosen = {
        "AIRFED_HOME": str(home),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFED_STORE_URL": f"file://{home / 'store'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    for key, value in chosen.items():
        if key in ("AIRFED_HOME", "AIRFLOW_HOME"):
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    if dags_folder is not None:
        os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder)
    # The user's client app package (e.g. examples/) must be importable by the step subprocesses.
    cwd = os.getcwd()
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *paths])
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return {k: os.environ[k] for k in chosen}


def migrate_airflow_db() -> None:
    """Create or upgrade Airflow's metadata DB (SQLite under AIRFED_HOME by default)."""
    from airflow.utils import db

    db.initdb()


class DataPreparationFailed(RuntimeError):
    """The spec's ``data.prepare`` function failed (its output was printed)."""


def prepare_silo_data(spec: JobSpec, out: TextIO) -> None:
    """Create the silos' missing example data (the spec's ``data.prepare``) in a subprocess; output to ``out``."""
    from airfed.runners.local import step_command  # the steps' interpreter: the data code is step-side

    argv = step_command(["python", "-m", "fl_tasks.prepare_data", spec.step_payload()])
    proc = subprocess.run(argv, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        print(line, file=out, flush=True)
    if proc.returncode != 0:
        raise DataPreparationFailed(f"preparing silo data for {spec.job} failed (exit {proc.returncode})")
