"""The embedded default: every path and URL under ``AIRFED_HOME`` unless the user set it.

``configure`` must run before Airflow is imported: Airflow reads its configuration at import time.
``migrate_airflow_db`` and ``prepare_silo_data`` are what ``airfed run`` and ``airfed up`` both do
on a fresh AIRFED_HOME.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

from fl_tasks.spec import JobSpec
from fl_tasks.store import airfed_home

#: How many steps run at once on the embedded default (default: the machine's cores).
PARALLELISM_ENV = "AIRFED_PARALLELISM"


def parallelism() -> int:
    """``AIRFED_PARALLELISM``, else the number of cores."""
    return max(1, int(os.environ.get(PARALLELISM_ENV) or os.cpu_count() or 1))


def configure(dags_folder: Path | None = None) -> dict[str, str]:
    """Set the env for Airflow, the store and MLflow; return what ``airfed`` itself chose.

    Concurrency: Airflow's LocalExecutor (``airfed up``) runs up to ``AIRFED_PARALLELISM`` tasks at
    once (``parallelism`` and ``max_active_tasks_per_dag``), so a round's silos train side by side.
    Each step gets ``cores // parallelism`` (at least 1) intra-op threads (``OMP_NUM_THREADS``):
    tiny per-silo models are several times slower when concurrent steps' thread pools fight over
    the cores. Any of these set by the user wins.
    """
    home = airfed_home()
    steps_at_once = parallelism()
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
        "AIRFLOW__CORE__PARALLELISM": str(steps_at_once),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(steps_at_once),
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // steps_at_once)),
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
    """Create the silos' missing example data (the spec's ``data.prepare``) as a step would run; output to ``out``.

    The data code is step-side: it runs through the step launcher with the job's step env, so on the
    warm path it also starts the server the round's steps will use.
    """
    from airfed.dag.step_calls import job_env
    from fl_tasks.warm import launcher_from_env, run

    env = {**os.environ, **job_env(spec)}
    code = run(launcher_from_env(env), ["python", "-m", "fl_tasks.prepare_data", spec.step_payload()], env,
               on_line=lambda line: print(line, file=out, flush=True))
    if code != 0:
        raise DataPreparationFailed(f"preparing silo data for {spec.job} failed (exit {code})")
