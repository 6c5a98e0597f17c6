"""Test setup: Airflow, the store and MLflow all live under throw-away directories.

Airflow reads its configuration when first imported, so its environment is set here, before any
test module imports it. Each test gets its own AIRFED_HOME (store, MLflow SQLite, data).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SESSION_HOME = Path(tempfile.mkdtemp(prefix="airfed-tests-"))

os.environ["AIRFED_HOME"] = str(SESSION_HOME / "home")
for var in ("AIRFED_STORE_URL", "MLFLOW_TRACKING_URI", "AIRFED_SPECS", "AIRFED_STEP_PYTHON", "AIRFED_STEP_LAUNCHER",
            "AIRFED_WARM_PRELOAD", "AIRFED_PARALLELISM"):
    os.environ.pop(var, None)
#: One warm step server per step env for the whole test run: the xdist workers inherit the directory
#: the first process (pytest itself) chose, share its servers (each step is still its own forked
#: process) and that process stops them at the end (``pytest_sessionfinish``). Per worker, the same
#: servers were started three times: ~6 s of CPU each.
SHARED_WARM_DIR_ENV = "AIRFED_TESTS_WARM_DIR"
WARM_DIR_OWNER = not os.environ.get(SHARED_WARM_DIR_ENV)
if WARM_DIR_OWNER:
    os.environ[SHARED_WARM_DIR_ENV] = tempfile.mkdtemp(prefix="airfed-tests-warm-")
WARM_DIR = Path(os.environ[SHARED_WARM_DIR_ENV])
os.environ["AIRFED_WARM_DIR"] = str(WARM_DIR)
sys.path.insert(0, str(REPO))
os.chdir(REPO)

from airfed.environment import configure  # noqa: E402

configure(dags_folder=REPO / "dags")

from s3_server import s3_endpoint, s3_store_url  # noqa: E402,F401


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No warm step server outlives the test run: the process that chose WARM_DIR stops them all."""
    if not WARM_DIR_OWNER:
        return
    from helpers import stop_warm_servers

    try:
        stop_warm_servers(WARM_DIR)
    except AssertionError as exc:
        print(f"\n{exc}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def airfed_home(tmp_path, monkeypatch) -> Path:
    """A fresh AIRFED_HOME with the embedded defaults (local store, SQLite MLflow)."""
    home = tmp_path / "airfed-home"
    home.mkdir()
    monkeypatch.setenv("AIRFED_HOME", str(home))
    monkeypatch.setenv("AIRFED_STORE_URL", f"file://{home / 'store'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    return home


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata DB, migrated once per session (SQLite)."""
    from airfed.environment import migrate_airflow_db

    migrate_airflow_db()


#: The slowest modules, slowest first. ``make test`` / ``make test-quick`` run pytest-xdist with ``--dist loadfile
#: --no-loadscope-reorder``: modules go to whichever worker is free in this order (longest first),
#: so the rehearsal (it builds both image environments from scratch) starts at once instead of
#: being the tail, and the short modules fill the gaps at the end.
SLOWEST_FIRST = (  # seconds in `make test` (3 workers, 2 cores, the rehearsal's environments already built)
    "tests/test_rehearse_faults.py",  # 200 (it builds the environments when they are missing)
    "tests/e2e/test_up.py",  # 115
    "tests/e2e/test_concurrent_runs.py",  # 70 (mostly waiting: two runs racing)
    "tests/e2e/test_faults.py",  # 41
    "tests/e2e/test_run.py",  # 36
    "tests/e2e/test_regions.py",  # 36
    "tests/e2e/test_approval.py",  # 33
    "tests/fl_tasks/test_launch.py",  # 31
    "tests/test_rehearse.py",  # 24 (after the faults module has built or found the environments)
    "tests/e2e/test_launcher_globals.py",  # 23
    "tests/plugins/airfed/cli/test_offline.py",  # 19
    "tests/fl_tasks/store/test_policy_enforcement.py",  # 18
    "tests/e2e/test_run_s3.py",  # 17
    "tests/e2e/test_kubernetes_pods.py",  # 15
    "tests/fl_tasks/test_round_faults.py",  # 14
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: file order kept


@pytest.hookimpl(trylast=True)  # after the module's fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After each module: collect, then freeze what is left out of the cyclic GC's way.

    A worker's heap only grows (Airflow's in-process execution API, MLflow's SQLAlchemy models,
    pydantic schemas: 1.4 M objects after tests/e2e/test_approval.py, 0.3 M at start), and every
    full collection walks all of it: measured, test_strategies.py's Bulyan cases then cost 90 s of
    CPU instead of 22 s. ``gc.freeze()`` moves the survivors to the permanent generation (the
    remedy Python's gc docs give for long-lived heaps); later garbage is collected as before.
    """
    if nextitem is None or nextitem.path != item.path:
        gc.collect()
        gc.freeze()
