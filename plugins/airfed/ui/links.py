"""Operator extra links from a round's tasks to MLflow: the round's run and the registered model version.

Airflow 3 computes an operator's extra links in the task process when the task finishes
(``get_link(operator, ti_key=...)``) and stores each URL as an XCom (``_link_<class name>``); the UI
reads that XCom back. A DAG run is one round: the links resolve from the run's ``register`` result
(its return-value XCom: experiment id, run id, model name and version), or from the round's
``registry.json`` in the store when the XCom is missing. The other steps finish before their round
is registered: they have no link (empty string), which the UI does not show.

The MLflow UI base URL is ``MLFLOW_UI_URL`` (``airfed up`` sets it to the server it starts), else the
tracking URI when that is an http(s) server, else ``http://localhost:5000``.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from airflow.sdk import BaseOperatorLink

MLFLOW_UI_URL_ENV = "MLFLOW_UI_URL"
DEFAULT_MLFLOW_UI_URL = "http://localhost:5000"


def mlflow_ui_url(tracking_uri: str | None = None) -> str:
    """Base URL of the MLflow UI (no trailing slash, never with credentials)."""
    explicit = os.environ.get(MLFLOW_UI_URL_ENV)
    if explicit:
        return explicit.rstrip("/")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return DEFAULT_MLFLOW_UI_URL


def experiment_url(experiment_id: str | int, base: str | None = None) -> str:
    return f"{base or mlflow_ui_url()}/#/experiments/{experiment_id}"


def run_url(experiment_id: str | int, run_id: str, base: str | None = None) -> str:
    return f"{base or mlflow_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(model_name: str, version: str | int, base: str | None = None) -> str:
    return f"{base or mlflow_ui_url()}/#/models/{quote(model_name, safe='')}/versions/{version}"


def model_url(model_name: str, base: str | None = None) -> str:
    return f"{base or mlflow_ui_url()}/#/models/{quote(model_name, safe='')}"


def step_result(ti_key: Any, step: str) -> Any:
    """The return-value XCom of ``step`` in the DAG run of ``ti_key``."""
    from airflow.sdk.execution_time.xcom import XCom  # the configured XCom backend

    from airfed.dag.builder import task_id

    return XCom.get_one(
        key="return_value", dag_id=ti_key.dag_id, task_id=task_id(step), run_id=ti_key.run_id, map_index=-1
    )


def round_summary(operator: Any, ti_key: Any) -> dict | None:
    """The register result of the round (this DAG run), or None while there is none.

    Only ``register`` looks: every other step finishes before its round is registered, so its links
    are empty, and asking for a missing XCom makes Airflow's client log an error for each."""
    if getattr(operator, "step", None) != "register":
        return None
    summary = step_result(ti_key, "register")
    if isinstance(summary, dict) and summary.get("mlflow_run_id"):
        return summary
    plan = step_result(ti_key, "distribute")
    if not isinstance(plan, dict) or "round" not in plan:
        return None
    from fl_tasks.store import JobKeys, open_store

    record = open_store().get_json_or_none(JobKeys(ti_key.dag_id).registry(int(plan["round"])))
    if isinstance(record, dict) and record.get("dag_run_id") == ti_key.run_id:
        return record
    return None


class MlflowRoundRunLink(BaseOperatorLink):
    """The round's nested MLflow run (metrics per silo, store keys and checksums)."""

    name = "MLflow round run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        summary = round_summary(operator, ti_key)
        if not summary:
            return ""
        base = mlflow_ui_url(summary.get("tracking_uri"))
        return run_url(summary["mlflow_experiment_id"], summary["mlflow_run_id"], base)


class RegisteredModelVersionLink(BaseOperatorLink):
    """The model registry version this round's global model became."""

    name = "Registered model version"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        summary = round_summary(operator, ti_key)
        if not summary or summary.get("registry_version") is None:
            return ""
        base = mlflow_ui_url(summary.get("tracking_uri"))
        return model_version_url(summary["registry_model"], summary["registry_version"], base)


def step_links() -> tuple[BaseOperatorLink, ...]:
    """The extra links every airfed step operator carries."""
    return (MlflowRoundRunLink(), RegisteredModelVersionLink())
