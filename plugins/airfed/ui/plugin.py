"""The airfed Airflow plugin (entry point ``airflow.plugins``: ``airfed = airfed.ui.plugin:AirfedPlugin``).

- ``fastapi_apps``: the FL jobs page mounted by the API server at ``/airfed`` (HTML at ``/airfed/``,
  JSON at ``/airfed/api/jobs``); built on first access, so the scheduler and task processes that
  load plugins never import FastAPI for it.
- ``external_views``: a top-level "FL jobs" entry in the Airflow UI's navigation, showing that page
  (embedded at ``/plugin/airfed``).
- ``operator_extra_links``: the "MLflow round run" and "Registered model version" links. They are
  declared on the step operators themselves (``LocalStepOperator``, ``FlStepPodOperator``), which is
  what makes Airflow 3 compute them when a task finishes and store them as XCom; listing them here
  documents them in ``airflow plugins`` / ``GET /api/v2/plugins`` (their ``operators`` list is
  empty, so they never replace the stored links of other operators).

Import is cheap: no torch, flwr, mlflow or FastAPI at import time.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airfed.ui.links import step_links

URL_PREFIX = "/airfed"

ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#017cee" stroke-width="2" '
    'stroke-linecap="round" stroke-linejoin="round"><circle cx="12" cy="12" r="3"/><circle cx="4" cy="5" r="2"/>'
    '<circle cx="20" cy="5" r="2"/><circle cx="12" cy="21" r="2"/><path d="M5.6 6.2 9.6 10M18.4 6.2 14.4 10'
    'M12 15v4"/></svg>'
)


def _app() -> Any:
    from fastapi.responses import Response

    from airfed.ui.jobs_page import create_app

    app = create_app()

    @app.get("/static/icon.svg", include_in_schema=False)
    def icon() -> Response:
        return Response(ICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    return app


class AirfedPlugin(AirflowPlugin):
    """FL jobs page + navigation entry + MLflow extra links for airfed's federated learning DAGs."""

    name = "airfed"
    external_views = [
        {
            "name": "FL jobs",
            "href": f"{URL_PREFIX}/",
            "url_route": "airfed",
            "destination": "nav",
            "nav_top_level": True,
            "icon": f"{URL_PREFIX}/static/icon.svg",
        }
    ]
    operator_extra_links = list(step_links())

    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [{"app": _app(), "url_prefix": URL_PREFIX, "name": "airfed FL jobs"}]
