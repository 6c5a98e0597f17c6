"""The embedded default: every path and URL under ``AIRFED_HOME`` unless the user set it.

Must run before Airflow is imported: Airflow reads its configuration at import time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def airfed_home() -> Path:
    return Path(os.environ.get("AIRFED_HOME", "~/.airfed")).expanduser().resolve()


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
