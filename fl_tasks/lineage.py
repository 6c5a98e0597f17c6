"""MLflow lineage: experiment per job, parent run per DAG run, nested run per round, registry.

Only server-side steps call this; silos never need MLflow credentials. Every lookup is by tags, so
re-running a register step finds the runs and model version it created before instead of
duplicating them.

An embedded SQLite tracking store (``sqlite:///...``) is created or upgraded once, under an
exclusive lock on ``<db>.lock`` beside the database, before this process talks to it: two steps
(or two runs) starting at once would otherwise both run MLflow's schema migrations on the same file
and break it (``table _alembic_tmp_... already exists``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fl_tasks.paths import airfed_home, redact_uri

if TYPE_CHECKING:
    from fl_tasks.records import RegionOutcome

TAG_JOB = "airfed.job"
TAG_DAG_RUN = "airfed.dag_run_id"
TAG_ROUND = "airfed.round"
TAG_KIND = "airfed.kind"
CHAMPION = "champion"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{airfed_home() / 'mlflow.db'}"


class LineageUnavailable(RuntimeError):
    """MLflow could not be reached or refused a call; the store's round is untouched by this."""


@contextmanager
def reporting_failures(what: str) -> Iterator[None]:
    """Turn MLflow/connection errors into one clear message naming the (redacted) tracking URI."""
    try:
        yield
    except (MlflowException, OSError, ConnectionError) as exc:
        raise LineageUnavailable(
            f"{what}: MLflow at {redact_uri(tracking_uri())} failed: {type(exc).__name__}: {exc}. "
            "The round's store records are intact; the task will be retried, or clear it once MLflow is reachable."
        ) from exc


_READY: set[str] = set()


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]  # sqlite:////abs/path or sqlite:///relative/path
    return None if path in ("", ":memory:") else Path(path)


def default_artifact_root() -> str:
    """Where a SQLite store keeps artifacts (AIRFED_MLFLOW_ARTIFACTS, else ``$AIRFED_HOME/mlartifacts``)."""
    return os.environ.get("AIRFED_MLFLOW_ARTIFACTS") or (airfed_home() / "mlartifacts").as_uri()


def prepare_sqlite(uri: str) -> None:
    """Create or upgrade the schema of a SQLite tracking store once, under a lock beside it."""
    db = _sqlite_path(uri)
    if db is None or uri in _READY:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        try:
            store = SqlAlchemyStore(uri, default_artifact_root())
        except MlflowException as exc:
            if "out-of-date database schema" not in str(exc):
                raise
            # an older MLflow created it: upgrade with MLflow's own command, then open it
            subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri], check=True,
                           capture_output=True, text=True)
            store = SqlAlchemyStore(uri, default_artifact_root())
        store.engine.dispose()
    _READY.add(uri)


def client() -> MlflowClient:
    uri = tracking_uri()
    prepare_sqlite(uri)
    # the client carries the URI: no process-wide mlflow.set_tracking_uri (it would outlive this call)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_root = os.environ.get("AIRFED_MLFLOW_ARTIFACTS")
    if artifact_root is None and tracking_uri().startswith("sqlite:"):
        # A SQLite store puts artifacts under ./mlruns by default; keep them in AIRFED_HOME instead.
        artifact_root = default_artifact_root()
    location = f"{artifact_root.rstrip('/')}/{name.replace('/', '_')}" if artifact_root else None
    return c.create_experiment(name, artifact_location=location, tags={TAG_JOB: name})


def _find_run(c: MlflowClient, experiment_id: str, tags: dict[str, str]) -> Run | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([experiment_id], filter_string=query, max_results=2, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def ensure_parent_run(c: MlflowClient, experiment_id: str, job: str, dag_run_id: str) -> Run:
    tags = {TAG_JOB: job, TAG_DAG_RUN: dag_run_id, TAG_KIND: "dag_run"}
    run = _find_run(c, experiment_id, tags)
    return run or c.create_run(experiment_id, tags=tags, run_name=dag_run_id)


def ensure_round_run(c: MlflowClient, experiment_id: str, job: str, dag_run_id: str, r: int, parent_id: str) -> Run:
    tags = {TAG_JOB: job, TAG_DAG_RUN: dag_run_id, TAG_ROUND: str(r), TAG_KIND: "round"}
    run = _find_run(c, experiment_id, tags)
    if run is not None:
        return run
    return c.create_run(
        experiment_id, tags={**tags, "mlflow.parentRunId": parent_id}, run_name=f"round-{r}"
    )


def _param_value(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    return text[:6000]


def log_round(c: MlflowClient, run_id: str, metrics: Mapping[str, float], params: Mapping[str, object],
              tags: Mapping[str, str], step: int) -> None:
    c.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()],
        params=[Param(k, _param_value(v)) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )


def ensure_registered_model(c: MlflowClient, name: str, job: str) -> None:
    if not c.search_registered_models(filter_string=f"name = '{name}'"):
        c.create_registered_model(
            name, tags={TAG_JOB: job}, description=f"Global model of the airfed job '{job}' (safetensors)."
        )


def round_versions(
    c: MlflowClient, name: str, job: str, r: int, dag_run_id: str, global_sha256: str | None = None
) -> list[ModelVersion]:
    """The versions of round ``r``, oldest first: registered by the same DAG run, or holding the same global."""
    def same_round(tags: dict[str, str]) -> bool:
        if tags.get("round") != str(r) or tags.get("job") != job:
            return False
        same_global = bool(global_sha256) and tags.get("global_sha256") == global_sha256
        return tags.get("dag_run_id") == dag_run_id or same_global

    same = [v for v in c.search_model_versions(f"name = '{name}'") if same_round(v.tags)]
    return sorted(same, key=lambda v: int(v.version))


def find_version(
    c: MlflowClient, name: str, job: str, r: int, dag_run_id: str, global_sha256: str | None = None
) -> ModelVersion | None:
    """The version of round ``r`` registered before (the oldest, see :func:`first_version`)."""
    return next(iter(round_versions(c, name, job, r, dag_run_id, global_sha256)), None)


def first_version(c: MlflowClient, name: str, job: str, r: int, dag_run_id: str, global_sha256: str,
                  created: ModelVersion) -> ModelVersion:
    """The one version round ``r`` keeps after ``created`` was registered for it.

    Two registers of a round can race (a run that lost the round finishes the winner's registration
    while the winner does; find_version saw nothing for either). The registry numbers versions in
    creation order, so the lowest of the round's versions is the one to keep: a register that created
    a higher one deletes it and carries on with the lowest. Each racer searches after its own create,
    so whichever created second sees the first and yields; exactly one version stays.
    """
    first = next(iter(round_versions(c, name, job, r, dag_run_id, global_sha256)), created)
    if int(first.version) < int(created.version):
        c.delete_model_version(name, str(created.version))
        return first
    return created


def register_version(c: MlflowClient, name: str, run_id: str, model_file: Path, tags: dict[str, str],
                     description: str) -> ModelVersion:
    c.log_artifact(run_id, str(model_file), artifact_path="model")
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    return c.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)


def champion(c: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def is_better(value: float, than: float | None, direction: str) -> bool:
    """Whether ``value`` beats the champion's ``than``: any real value beats a missing or NaN one
    (a champion without a usable metric must not hold the alias forever); NaN beats nothing."""
    if math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value > than if direction == "maximize" else value < than


def region_lineage(regions: Mapping[str, RegionOutcome] | None) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics and tags of a round's regions (``Result.regions``): per region its partial's key and
    sha256, accepted silos and total weight, or that it was missing and why. Empty for a flat job."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for name, outcome in (regions or {}).items():
        metrics[f"region.{name}.accepted"] = len(outcome.accepted)
        metrics[f"region.{name}.total_weight"] = outcome.total_weight
        metrics[f"region.{name}.contributed"] = 1 if outcome.contributed else 0
        tags[f"region.{name}.accepted_silos"] = ",".join(outcome.accepted)
        if outcome.partial is not None:
            tags[f"region.{name}.partial_key"] = outcome.partial.key
            tags[f"region.{name}.partial_sha256"] = outcome.partial.sha256
        if not outcome.contributed:
            tags[f"region.{name}.missing"] = outcome.reason[:4000]
    if regions:
        tags["regions.missing"] = ",".join(n for n, o in regions.items() if not o.contributed) or "none"
    return metrics, tags
