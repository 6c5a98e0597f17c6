"""The FL jobs page of the Airflow plugin: every job spec in the DAGs folder with its latest rounds.

Served by the Airflow API server under ``/airfed`` (a FastAPI sub-application, see
``airfed.airflow_plugin``): ``/airfed/`` is a server-rendered HTML page, ``/airfed/api/jobs`` the same
data as JSON. Per job: the spec (schedule, strategy, silos, registry model), the committed HEAD round,
the last rounds from the store's round records (``rounds/<r>/registry.json``, or ``result.json`` for
a round that was not registered) with the promotion metric, accepted/rejected silos, the registry
version and champion, and links to the DAG, its runs and MLflow.

Both endpoints need an Airflow login (the UI's session cookie or an API bearer token) and list only
the jobs whose DAG the user may read. No torch, flwr or mlflow imports: the store is read directly.
Imported only by the API server (the plugin builds this app on first access).
"""

from __future__ import annotations

import concurrent.futures
import html
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from airfed import links

#: How many recent rounds a job shows by default (``?rounds=N`` changes it, up to MAX_ROUNDS).
DEFAULT_ROUNDS = 10
MAX_ROUNDS = 200
#: A store that does not answer within this many seconds is reported instead of hanging the page.
STORE_TIMEOUT_SECONDS = 10.0
URL_PREFIX = "/airfed"


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
            continue
        result = store.get_json_or_none(keys.result(r)) or {"round": r}
        rows.append(_round_row(job, {**result, "round": r}, "committed, not registered", ui, prefix))
    failed = store.get_json_or_none(keys.result(top + 1))
    if failed is not None and not failed.get("committed", True):
        rows.append(_round_row(job, {**failed, "round": top + 1}, "not committed", ui, prefix))
    return head_round, rows


def _job_entry(spec: Any, spec_path: Path, store: Any, last: int, ui: str, prefix: str) -> dict[str, Any]:
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
        "promotion": {"metric": spec.promotion.metric, "direction": spec.promotion.direction},
        "head_round": None,
        "champion_version": None,
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
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(_store_rounds, store, spec.job, last, ui, prefix)
        entry["head_round"], entry["rounds"] = future.result(timeout=STORE_TIMEOUT_SECONDS)
    except concurrent.futures.TimeoutError:
        entry["error"] = f"the store {store.url} did not answer within {STORE_TIMEOUT_SECONDS:.0f}s"
    except Exception as exc:  # noqa: BLE001 - one unreadable job must not hide the others
        entry["error"] = f"reading the store {store.url} failed: {type(exc).__name__}: {exc}"
    finally:
        pool.shutdown(wait=False)
    registered = [r for r in entry["rounds"] if r["registry_version"] is not None]
    if registered:
        latest = registered[-1]
        entry["latest_version"] = latest["registry_version"]
        entry["champion_version"] = latest["champion_version"]
        if latest["mlflow_experiment_id"]:
            entry["links"]["mlflow_experiment"] = links.experiment_url(latest["mlflow_experiment_id"], ui)
        if latest["champion_version"] is not None:
            entry["links"]["champion"] = links.model_version_url(spec.model_name, latest["champion_version"], ui)
    return entry


def collect_jobs(folder: Path | None = None, last: int = DEFAULT_ROUNDS, store: Any = None) -> dict[str, Any]:
    """Every valid spec in ``folder`` (default: Airflow's DAGs folder) with its recent rounds."""
    from airfed.spec_loader import SpecError, find_specs, load_spec
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
        jobs.append(_job_entry(spec, path, store, last, ui, prefix))
    return {
        "dags_folder": str(folder),
        "store_url": store.url,
        "mlflow_ui_url": ui,
        "jobs": jobs,
        "problems": problems,
    }


# -- HTML ------------------------------------------------------------------------------------------
CSS = """
:root { --fg:#1f2933; --muted:#66788a; --line:#e3e8ee; --bg:#f6f8fa; --card:#fff; --accent:#017cee;
        --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; padding:24px 28px; font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,
       "Helvetica Neue",Arial,sans-serif; color:var(--fg); background:var(--bg); }
h1 { font-size:22px; margin:0 0 4px; } h2 { font-size:18px; margin:0; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
.sub { color:var(--muted); margin-bottom:20px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:18px 20px;
        margin-bottom:20px; box-shadow:0 1px 2px rgba(0,0,0,.04); }
.head { display:flex; flex-wrap:wrap; align-items:center; gap:10px 16px; }
.head .links { margin-left:auto; display:flex; gap:14px; }
.desc { color:var(--muted); margin:6px 0 12px; }
.facts { display:flex; flex-wrap:wrap; gap:8px 28px; margin:10px 0 14px; }
.fact .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.fact .v { font-weight:600; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600;
         background:#eef4fb; color:var(--accent); border:1px solid #cfe2f7; white-space:nowrap; }
.badge.champ { background:#fff6d6; color:#7a5a00; border-color:#f0dc8c; }
.badge.ok { background:#e9f6ec; color:var(--ok); border-color:#bfe3c8; }
.badge.bad { background:#fdecee; color:var(--bad); border-color:#f5c2c7; }
.badge.warn { background:#fff8e1; color:var(--warn); border-color:#f0dc8c; }
table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
th { text-align:left; font-size:12px; color:var(--muted); font-weight:600; text-transform:uppercase;
     letter-spacing:.03em; border-bottom:1px solid var(--line); padding:6px 8px; }
td { border-bottom:1px solid var(--line); padding:7px 8px; vertical-align:top; white-space:nowrap; }
td.silos, td.others { white-space:normal; } td.silos { min-width:170px; }
th { white-space:nowrap; }
.scroll { overflow-x:auto; }
tr:last-child td { border-bottom:none; }
td.num { text-align:right; } th.num { text-align:right; }
.silo { display:inline-block; margin:0 4px 2px 0; padding:0 6px; border-radius:4px; font-size:12px; }
.silo.ok { background:#e9f6ec; color:var(--ok); } .silo.bad { background:#fdecee; color:var(--bad); }
.muted { color:var(--muted); } .error { color:var(--bad); }
.problems { background:#fff8e1; border:1px solid #f0dc8c; border-radius:8px; padding:12px 16px; margin-bottom:20px; }
.problems pre { margin:6px 0 0; white-space:pre-wrap; font-size:12px; }
.spark { vertical-align:middle; }
.empty { color:var(--muted); padding:8px 0; }
.note { color:var(--bad); font-size:12px; margin-top:2px; max-width:460px; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _a(href: str | None, text: str, external: bool = False) -> str:
    if not href:
        return f'<span class="muted">{_e(text)}</span>'
    target = ' target="_blank" rel="noopener"' if external else ' target="_top"'
    return f'<a href="{_e(href)}"{target}>{_e(text)}</a>'


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "–"


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
        return f"{kind} {stamp[:10]} {stamp[11:16]}"
    return run_id


def _duration(row: dict) -> str:
    start, end = row.get("started_at"), row.get("finished_at")
    if isinstance(start, int | float) and isinstance(end, int | float) and end >= start:
        return f"{end - start:.0f}s"
    return "–"


def _sparkline(values: list[float], width: int = 160, height: int = 34) -> str:
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = (width - 8) / (len(values) - 1)
    pts = " ".join(
        f"{4 + i * step:.1f},{height - 4 - (v - lo) / span * (height - 8):.1f}" for i, v in enumerate(values)
    )
    last_x, last_y = pts.split(" ")[-1].split(",")
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="promotion metric per round"><polyline fill="none" stroke="#017cee" stroke-width="2" '
        f'points="{pts}"/><circle cx="{last_x}" cy="{last_y}" r="3" fill="#017cee"/></svg>'
    )


def _silos_cell(row: dict) -> str:
    parts = [f'<span class="silo ok" title="accepted">&#10003; {_e(s)}</span>' for s in row["accepted"]]
    parts += [
        f'<span class="silo bad" title="{_e(reason)}">&#10007; {_e(s)}</span>'
        for s, reason in sorted(row["rejected"].items())
    ]
    chips = "".join(parts) or '<span class="muted">–</span>'
    notes = [f"{s}: {reason}" for s, reason in sorted(row["rejected"].items())]
    if row["status"] != "registered" and row["reason"]:
        notes.insert(0, row["reason"])
    lines = "".join(
        f'<div class="note" title="{_e(n)}">{_e(n if len(n) <= 110 else n[:107] + "...")}</div>' for n in notes
    )
    return chips + lines


def _round_rows(job: dict) -> str:
    metric = job["promotion"]["metric"]
    out = []
    for row in reversed(job["rounds"]):
        if row["status"] == "registered":
            version = _a(row["links"]["model_version"], f"v{row['registry_version']}", external=True)
            if row["promoted"]:
                version += ' <span class="badge champ" title="became champion">&#9733; champion</span>'
            status = ""
        else:
            version = '<span class="muted">–</span>'
            css = "bad" if row["status"] == "not committed" else "warn"
            status = f' <span class="badge {css}" title="{_e(row["reason"])}">{_e(row["status"])}</span>'
        others = ", ".join(
            f"{_e(k)} {_num(v)}" for k, v in sorted(row["metrics"].items()) if k != metric
        )
        run_label = _run_label(row["dag_run_id"])
        out.append(
            "<tr>"
            f"<td><b>{row['round']}</b>{status}</td>"
            f'<td title="{_e(row["dag_run_id"])}">{_a(row["links"]["dag_run"], run_label)}</td>'
            f'<td class="silos">{_silos_cell(row)}</td>'
            f'<td class="num">{_num(row["train_loss"])}</td>'
            f'<td class="num"><b>{_num(row["metrics"].get(metric))}</b></td>'
            f'<td class="muted others">{others or "–"}</td>'
            f"<td>{version}</td>"
            f'<td class="num">{_e("v" + str(row["champion_version"]) if row["champion_version"] else "–")}</td>'
            f"<td>{_a(row['links']['mlflow_run'], 'run', external=True)}</td>"
            f'<td class="num">{_duration(row)}</td>'
            f'<td class="muted">{_e(_when(row["finished_at"]))}</td>'
            "</tr>"
        )
    return "".join(out)


def _job_card(job: dict) -> str:
    metric = job["promotion"]["metric"]
    values = [r["metrics"][metric] for r in job["rounds"] if metric in r["metrics"]]
    champion = (
        _a(job["links"]["champion"], f"v{job['champion_version']}", external=True)
        if job["champion_version"] is not None else '<span class="muted">none yet</span>'
    )
    latest = f"{values[-1]:.4f}" if values else "–"
    facts = [
        ("HEAD round", _e(job["head_round"] if job["head_round"] is not None else "none yet")),
        ("champion", champion),
        (f"{metric} ({job['promotion']['direction']})", f"{latest} {_sparkline(values)}"),
        ("schedule", _e(job["schedule"] or "manual (UI / API)")),
        ("strategy", _e(job["strategy"])),
        ("silos", _e(", ".join(job["silos"]))),
        ("model", _a(job["links"]["mlflow_model"], job["registry_model"], external=True)),
        ("runner", _e(job["runner"])),
    ]
    facts_html = "".join(f'<div class="fact"><div class="k">{_e(k)}</div><div class="v">{v}</div></div>'
                         for k, v in facts)
    if job["error"]:
        body = f'<div class="error">{_e(job["error"])}</div>'
    elif not job["rounds"]:
        body = '<div class="empty">No rounds yet: trigger the DAG from the Airflow UI or the REST API.</div>'
    else:
        body = (
            '<div class="scroll"><table><thead><tr><th>Round</th><th>DAG run</th><th>Silos</th>'
            "<th class=num>Train loss</th>"
            f"<th class=num>{_e(metric)}</th><th>Other metrics</th><th>Model version</th>"
            "<th class=num>Champion</th><th>MLflow</th><th class=num>Took</th><th>Finished (UTC)</th></tr></thead>"
            f"<tbody>{_round_rows(job)}</tbody></table></div>"
        )
    return (
        f'<section class="card" id="job-{_e(job["job"])}"><div class="head"><h2>{_e(job["job"])}</h2>'
        f'<span class="badge">{len(job["silos"])} silos</span>'
        f'<div class="links">{_a(job["links"]["dag"], "DAG")}'
        f'{_a(job["links"]["mlflow_experiment"], "MLflow experiment", external=True)}</div></div>'
        f'<div class="desc">{_e(job["description"])}</div>'
        f'<div class="facts">{facts_html}</div>{body}</section>'
    )


def render_html(data: dict[str, Any]) -> str:
    problems = ""
    if data["problems"]:
        problems = (
            '<div class="problems"><b>Invalid job specs</b> (their DAGs are not loaded)'
            f'<pre>{_e(chr(10).join(data["problems"]))}</pre></div>'
        )
    cards = "".join(_job_card(job) for job in data["jobs"]) or (
        f'<div class="card empty">No job specs in {_e(data["dags_folder"])}.</div>'
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>airfed: federated learning jobs</title><style>{CSS}</style></head><body>"
        "<h1>Federated learning jobs</h1>"
        f'<div class="sub">Specs in <code>{_e(data["dags_folder"])}</code> &middot; store '
        f'<code>{_e(data["store_url"])}</code> &middot; MLflow {_a(data["mlflow_ui_url"], data["mlflow_ui_url"], True)}'
        f' &middot; <a href="{URL_PREFIX}/api/jobs" target="_blank" rel="noopener">JSON</a></div>'
        f"{problems}{cards}</body></html>"
    )


# -- the FastAPI app -------------------------------------------------------------------------------
class NotAuthenticated(Exception):
    pass


def create_app() -> FastAPI:
    """The FastAPI sub-application the plugin mounts at ``/airfed``."""
    app = FastAPI(title="airfed", description="Federated learning jobs (airfed)", docs_url=None, redoc_url=None)

    async def current_user(request: Request) -> Any:
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
        except Exception as exc:  # noqa: BLE001 - expired / invalid token
            raise NotAuthenticated() from exc

    def visible(data: dict[str, Any], user: Any) -> dict[str, Any]:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

        am = get_auth_manager()
        data["jobs"] = [
            j for j in data["jobs"] if am.is_authorized_dag(method="GET", details=DagDetails(id=j["job"]), user=user)
        ]
        return data

    @app.exception_handler(NotAuthenticated)
    async def _unauthenticated(request: Request, exc: NotAuthenticated):
        if "/api/" in request.url.path:
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        from airflow.api_fastapi.app import get_auth_manager

        return RedirectResponse(get_auth_manager().get_url_login(next_url=f"{URL_PREFIX}/"), status_code=303)

    @app.get("/", response_class=HTMLResponse, summary="FL jobs page")
    async def jobs_page(request: Request, rounds: int = Query(DEFAULT_ROUNDS, ge=1, le=MAX_ROUNDS)) -> HTMLResponse:
        from starlette.concurrency import run_in_threadpool

        user = await current_user(request)
        data = await run_in_threadpool(collect_jobs, None, rounds)
        return HTMLResponse(render_html(visible(data, user)))

    @app.get("/api/jobs", summary="FL jobs as JSON")
    async def jobs_json(request: Request, rounds: int = Query(DEFAULT_ROUNDS, ge=1, le=MAX_ROUNDS)) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        user = await current_user(request)
        data = await run_in_threadpool(collect_jobs, None, rounds)
        return JSONResponse(visible(data, user))

    @app.get("/api/jobs/{job}", summary="One FL job as JSON")
    async def job_json(request: Request, job: str,
                       rounds: int = Query(DEFAULT_ROUNDS, ge=1, le=MAX_ROUNDS)) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        user = await current_user(request)
        data = visible(await run_in_threadpool(collect_jobs, None, rounds), user)
        for entry in data["jobs"]:
            if entry["job"] == job:
                return JSONResponse(entry)
        return JSONResponse({"detail": f"no job {job!r} in {data['dags_folder']}"}, status_code=404)

    return app
