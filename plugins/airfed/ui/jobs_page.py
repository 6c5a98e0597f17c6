"""The FL jobs page of the Airflow plugin: every job spec in the DAGs folder with its latest rounds.

Served by the Airflow API server under ``/airfed`` (a FastAPI sub-application, see
``airfed.ui.plugin``): ``/airfed/`` is an HTML page rendered from ``templates/jobs.html``, ``/airfed/api/jobs`` the same
data as JSON. Per job: the spec (schedule, strategy, silos, registry model), the committed HEAD round,
the last rounds from the store's round records (``rounds/<r>/registry.json``, or ``result.json`` for
a round that was not registered) with the promotion metric, accepted/rejected silos, the registry
version and champion, and links to the DAG, its runs and MLflow. The champion is the current holder
of the alias (``champion.json``, written by every move; else the latest round's record); with
``promotion.approval: required`` the candidates awaiting approval (linked to their approval task)
and the rejected versions come from the rounds' ``approval.json``.

Both endpoints need an Airflow login (the UI's session cookie or an API bearer token) and list only
the jobs whose DAG the user may read. No torch, flwr or mlflow imports: the store is read directly.
Imported only by the API server (the plugin builds this app on first access).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from airfed.ui import links

#: How many recent rounds a job shows by default (``?rounds=N`` changes it, up to MAX_ROUNDS).
DEFAULT_ROUNDS = 10
MAX_ROUNDS = 200
#: A store that does not answer within this many seconds is reported instead of hanging the page.
STORE_TIMEOUT_SECONDS = 10.0
#: Store reads in flight at most, across all requests: a dead or hanging store holds at most this
#: many threads (a read that never returns keeps its thread; later requests are answered "busy").
STORE_READERS = 4
_store_pool = concurrent.futures.ThreadPoolExecutor(max_workers=STORE_READERS, thread_name_prefix="airfed-store")
_store_slots = threading.BoundedSemaphore(STORE_READERS)
URL_PREFIX = "/airfed"
TEMPLATES = Path(__file__).resolve().parent / "templates"


# -- data ------------------------------------------------------------------------------------------
def dags_folder() -> Path:
    folder = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    if not folder:
        from airflow.configuration import conf

        folder = conf.get("core", "dags_folder")
    return Path(folder).expanduser()


def airflow_prefix() -> str:
    """Path prefix of the Airflow UI (from ``[api] base_url``), '' when served at the root."""
    base = os.environ.get("AIRFLOW__API__BASE_URL")
    if base is None:
        try:
            from airflow.configuration import conf

            base = conf.get("api", "base_url", fallback="") or ""
        except Exception:  # noqa: BLE001 - outside Airflow: links relative to the root
            base = ""
    return urlsplit(base).path.rstrip("/")


def _round_row(job: str, record: dict, status: str, ui: str, prefix: str) -> dict[str, Any]:
    run_id = record.get("dag_run_id")
    exp, mlflow_run = record.get("mlflow_experiment_id"), record.get("mlflow_run_id")
    model, version = record.get("registry_model"), record.get("registry_version")
    return {
        "round": record["round"],
        "status": status,
        "dag_run_id": run_id,
        "accepted": sorted(record.get("accepted") or []),
        "rejected": dict(record.get("rejected") or {}),
        "reason": record.get("reason"),
        "train_loss": record.get("train_loss"),
        "metrics": dict(record.get("metrics") or {}),
        "promotion_metric": record.get("promotion_metric"),
        "promotion_value": record.get("promotion_value"),
        "registry_version": version,
        "champion_version": record.get("champion_version"),
        "promoted": record.get("promoted"),
        "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "mlflow_experiment_id": exp,
        "mlflow_run_id": mlflow_run,
        "links": {
            "dag_run": f"{prefix}/dags/{quote(job)}/runs/{quote(run_id, safe='')}" if run_id else None,
            "mlflow_run": links.run_url(exp, mlflow_run, ui) if exp and mlflow_run else None,
            "model_version": links.model_version_url(model, version, ui) if model and version else None,
        },
    }


def approval_task_url(prefix: str, approval: dict) -> str:
    """The approval task of a candidate (Airflow's "required actions" page of that task)."""
    return (f"{prefix}/dags/{quote(approval['approval_dag_id'])}/runs/{quote(approval['approval_run_id'], safe='')}"
            "/tasks/approve/required_actions")


def _approval(record: dict | None, prefix: str) -> dict[str, Any] | None:
    """A round's ``approval.json`` (``promotion.approval: required``) as the page shows it."""
    if not record:
        return None
    keep = ("state", "version", "by", "at", "reason", "timed_out", "requested_at", "approval_dag_id", "approval_run_id")
    return {**{k: record.get(k) for k in keep}, "link": approval_task_url(prefix, record)}


def _store_rounds(store: Any, job: str, last: int, ui: str, prefix: str) -> tuple[int | None, list[dict]]:
    """HEAD round and the last ``last`` rounds (ascending), plus a failed round after HEAD if any."""
    from fl_tasks.store import JobKeys

    keys = JobKeys(job)
    head = store.get_json_or_none(keys.head)
    head_round = int(head["round"]) if head else None
    rows: list[dict] = []
    top = head_round or 0
    for r in range(max(1, top - last + 1), top + 1):
        record = store.get_json_or_none(keys.registry(r))
        if record is not None:
            rows.append(_round_row(job, record, "registered", ui, prefix))
            rows[-1]["approval"] = _approval(store.get_json_or_none(keys.approval(r)), prefix)
            continue
        result = store.get_json_or_none(keys.result(r)) or {"round": r}
        rows.append(_round_row(job, {**result, "round": r}, "committed, not registered", ui, prefix))
    failed = store.get_json_or_none(keys.result(top + 1))
    if failed is not None and not failed.get("committed", True):
        rows.append(_round_row(job, {**failed, "round": top + 1}, "not committed", ui, prefix))
    return head_round, rows


class StoreBusy(Exception):
    """Every store reader is still waiting on the store: no new read is started."""


def _read_bounded(read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)`` on the shared store-reader pool, within STORE_TIMEOUT_SECONDS; StoreBusy when
    all STORE_READERS are still stuck on earlier reads (so threads never pile up behind a dead store)."""
    if not _store_slots.acquire(blocking=False):
        raise StoreBusy(f"is not answering: {STORE_READERS} earlier reads are still waiting")

    def run() -> Any:
        try:
            return read(*args)
        finally:
            _store_slots.release()

    return _store_pool.submit(run).result(timeout=STORE_TIMEOUT_SECONDS)


def _job_entry(spec: Any, spec_path: Path, store: Any, last: int, ui: str, prefix: str) -> dict[str, Any]:
    from fl_tasks.store import JobKeys

    entry: dict[str, Any] = {
        "job": spec.job,
        "description": spec.description,
        "spec_path": str(spec_path),
        "schedule": spec.schedule,
        "runner": spec.runner,
        "strategy": spec.strategy.name,
        "silos": [s.name for s in spec.silos],
        "registry_model": spec.model_name,
        "experiment": spec.experiment_name,
        "promotion": {"metric": spec.promotion.metric, "direction": spec.promotion.direction,
                      "approval": spec.promotion.approval},
        "head_round": None,
        "champion_version": None,
        "champion": None,
        "awaiting_approval": [],
        "rejected_versions": [],
        "latest_version": None,
        "rounds": [],
        "error": None,
        "links": {
            "dag": f"{prefix}/dags/{quote(spec.job)}",
            "mlflow_experiment": None,
            "mlflow_model": links.model_url(spec.model_name, ui),
            "champion": None,
        },
    }
    try:
        entry["head_round"], entry["rounds"] = _read_bounded(_store_rounds, store, spec.job, last, ui, prefix)
        entry["champion"] = _read_bounded(store.get_json_or_none, JobKeys(spec.job).champion)
    except StoreBusy as exc:
        entry["error"] = f"the store {store.url} {exc}"
    except concurrent.futures.TimeoutError:
        entry["error"] = f"the store {store.url} did not answer within {STORE_TIMEOUT_SECONDS:.0f}s"
    except Exception as exc:  # noqa: BLE001 - one unreadable job must not hide the others
        entry["error"] = f"reading the store {store.url} failed: {type(exc).__name__}: {exc}"
    registered = [r for r in entry["rounds"] if r["registry_version"] is not None]
    if registered:
        latest = registered[-1]
        entry["latest_version"] = latest["registry_version"]
        entry["champion_version"] = latest["champion_version"]
        if latest["mlflow_experiment_id"]:
            entry["links"]["mlflow_experiment"] = links.experiment_url(latest["mlflow_experiment_id"], ui)
    if entry.get("champion"):  # champion.json: the current holder, whoever moved it last (a person or register)
        entry["champion_version"] = entry["champion"]["version"]
    if entry["champion_version"] is not None:
        entry["links"]["champion"] = links.model_version_url(spec.model_name, entry["champion_version"], ui)
    approvals = [r["approval"] for r in entry["rounds"] if r.get("approval")]
    entry["awaiting_approval"] = [a for a in approvals if a["state"] == "pending"]
    entry["rejected_versions"] = [a for a in approvals if a["state"] == "rejected"]
    return entry


def collect_jobs(folder: Path | None = None, last: int = DEFAULT_ROUNDS, store: Any = None,
                 can_read: Callable[[str], bool] = lambda _job: True) -> dict[str, Any]:
    """Every valid spec in ``folder`` (default: Airflow's DAGs folder) whose DAG ``can_read`` allows,
    with its recent rounds; the store is read only for those (authorization first)."""
    from airfed.spec import SpecError, find_specs, load_spec
    from fl_tasks.store import open_store

    folder = folder or dags_folder()
    ui = links.mlflow_ui_url()
    prefix = airflow_prefix()
    store = store or open_store()
    jobs: list[dict] = []
    problems: list[str] = []
    paths = find_specs(folder) if folder.is_dir() else []
    for path in paths:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            problems.extend(str(p) for p in exc.problems)
            continue
        if can_read(spec.job):
            jobs.append(_job_entry(spec, path, store, last, ui, prefix))
    return {
        "dags_folder": str(folder),
        "store_url": store.url,
        "mlflow_ui_url": ui,
        "jobs": jobs,
        "problems": problems,
    }


# -- HTML ------------------------------------------------------------------------------------------
def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "–"


def _when(value: Any) -> str:
    """A record's timestamp (epoch seconds, or ISO text) as ``YYYY-MM-DD HH:MM`` UTC."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M")
    return str(value or "")[:16].replace("T", " ")


def _run_label(run_id: str | None) -> str:
    """``manual__2026-11-22T22:41:59.885058+00:00`` → ``manual 2026-11-22 22:41`` (full id as tooltip)."""
    if not run_id:
        return "–"
    kind, sep, stamp = run_id.partition("__")
    if sep and len(stamp) >= 16 and stamp[10] == "T":
        rest = stamp.partition("__")[2]  # a chained round: ``<first run id>__rounds_left_<n>``
        return f"{kind} {stamp[:10]} {stamp[11:16]}" + (f" ({rest.replace('_', ' ')})" if rest else "")
    return run_id


def _duration(row: dict) -> str:
    start, end = row.get("started_at"), row.get("finished_at")
    if isinstance(start, int | float) and isinstance(end, int | float) and end >= start:
        return f"{end - start:.0f}s"
    return "–"


def _metric_values(job: dict) -> list[float]:
    """The promotion metric of each shown round that has it (the sparkline), oldest first."""
    metric = job["promotion"]["metric"]
    return [r["metrics"][metric] for r in job["rounds"] if isinstance(r["metrics"].get(metric), int | float)]


@cache
def templates() -> Any:
    """The page's Jinja2 environment (templates/ beside this module; autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, when=_when, run_label=_run_label, duration=_duration)
    env.globals.update(metric_values=_metric_values, url_prefix=URL_PREFIX)
    return env


def render_html(data: dict[str, Any]) -> str:
    """The FL jobs page for ``collect_jobs``' data."""
    return templates().get_template("jobs.html").render(data=data)


# -- the FastAPI app -------------------------------------------------------------------------------
class NotAuthenticated(Exception):
    pass


class AirflowAuth:
    """Who a request is and what they may read, asked of Airflow's configured auth manager."""

    async def user(self, request: Request) -> Any:
        """The Airflow user of the request: bearer token first, else the UI's session cookie."""
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        token = token or request.cookies.get(COOKIE_NAME_JWT_TOKEN)
        if not token:
            raise NotAuthenticated()
        try:
            return await get_auth_manager().get_user_from_token(token)
        except Exception as exc:  # expired / invalid token (re-raised as NotAuthenticated)
            raise NotAuthenticated() from exc

    def can_read_dag(self, user: Any, dag_id: str) -> bool:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

        return get_auth_manager().is_authorized_dag(method="GET", details=DagDetails(id=dag_id), user=user)

    def login_url(self, next_url: str) -> str:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=next_url)


def readable_jobs(data: dict[str, Any], can_read: Callable[[str], bool]) -> dict[str, Any]:
    """``data`` with only the jobs whose DAG ``can_read`` allows."""
    return {**data, "jobs": [job for job in data["jobs"] if can_read(job["job"])]}


def create_app(auth: Any = None, collect: Callable[..., dict[str, Any]] = collect_jobs) -> FastAPI:
    """The FastAPI sub-application the plugin mounts at ``/airfed``.

    ``auth`` (default: Airflow's auth manager) and ``collect`` (default: the DAGs folder and the
    store) are parameters so that the page can be served from sample data in tests.
    """
    from starlette.concurrency import run_in_threadpool

    auth = auth or AirflowAuth()
    app = FastAPI(title="airfed", description="Federated learning jobs (airfed)", docs_url=None, redoc_url=None)

    async def jobs_for(request: Request, rounds: int) -> dict[str, Any]:
        user = await auth.user(request)

        def can_read(dag_id: str) -> bool:
            return bool(auth.can_read_dag(user, dag_id))

        data = await run_in_threadpool(collect, None, rounds, can_read=can_read)
        return readable_jobs(data, can_read)  # whatever ``collect`` is, only readable DAGs leave

    @app.exception_handler(NotAuthenticated)
    async def unauthenticated(request: Request, exc: NotAuthenticated) -> Any:
        if "/api/" in request.url.path:
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        return RedirectResponse(auth.login_url(f"{URL_PREFIX}/"), status_code=303)

    @app.get("/", response_class=HTMLResponse, summary="FL jobs page")
    async def jobs_page(request: Request, rounds: int = Query(DEFAULT_ROUNDS, ge=1, le=MAX_ROUNDS)) -> HTMLResponse:
        return HTMLResponse(render_html(await jobs_for(request, rounds)))

    @app.get("/api/jobs", summary="FL jobs as JSON")
    async def jobs_json(request: Request, rounds: int = Query(DEFAULT_ROUNDS, ge=1, le=MAX_ROUNDS)) -> JSONResponse:
        return JSONResponse(await jobs_for(request, rounds))

    @app.get("/api/jobs/{job}", summary="One FL job as JSON")
    async def job_json(request: Request, job: str,
                       rounds: int = Query(DEFAULT_ROUNDS, ge=1, le=MAX_ROUNDS)) -> JSONResponse:
        data = await jobs_for(request, rounds)
        for entry in data["jobs"]:
            if entry["job"] == job:
                return JSONResponse(entry)
        return JSONResponse({"detail": f"no job {job!r} in {data['dags_folder']}"}, status_code=404)

    return app
