"""A job's model Asset event sent through Airflow's REST API, from where no Airflow runs.

Inside Airflow the round and approval DAGs emit the event themselves (``ModelEventOperator``). A
person who moves `champion` with ``airfed promote`` / ``airfed rollback`` does it from a shell or a
one-shot pod of the fl-task image, which has no Airflow: the event goes through the public API,
``POST /api/v2/assets/events``, so consumers scheduled on ``airfed.<job>.model`` (such as a batch
scoring DAG) run with the new champion exactly as after an approval.

Where Airflow is comes from the environment only (``AIRFED_AIRFLOW_URL``), and so does who we are
to it: ``AIRFED_AIRFLOW_TOKEN`` (a JWT), or ``AIRFED_AIRFLOW_USERNAME`` + ``AIRFED_AIRFLOW_PASSWORD``
exchanged for one at ``POST /auth/token``. Stdlib only: no Airflow import.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

URL_ENV = "AIRFED_AIRFLOW_URL"
TOKEN_ENV = "AIRFED_AIRFLOW_TOKEN"
USERNAME_ENV = "AIRFED_AIRFLOW_USERNAME"
PASSWORD_ENV = "AIRFED_AIRFLOW_PASSWORD"
TIMEOUT = 30.0


class AirflowApiError(RuntimeError):
    """Airflow's API refused or could not be reached (the message names the request and the answer)."""


def model_asset_name(job: str) -> str:
    """The name of the job's model Asset, as the DAG builder declares it."""
    return f"airfed.{job}.model"


@dataclass(frozen=True)
class AirflowApi:
    """Airflow's public REST API at ``url`` (its base, e.g. ``http://airflow-api-server:8080``) as one user."""

    url: str
    token: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AirflowApi | None:
        """The API the environment names, logged in; None when ``AIRFED_AIRFLOW_URL`` is unset."""
        env = dict(os.environ if env is None else env)
        url = env.get(URL_ENV, "").rstrip("/")
        if not url:
            return None
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise AirflowApiError(f"{URL_ENV}={url!r}: expected the http(s) URL of Airflow's API server")
        if token := env.get(TOKEN_ENV):
            return cls(url, token)
        username, password = env.get(USERNAME_ENV), env.get(PASSWORD_ENV)
        if not (username and password):
            raise AirflowApiError(f"{URL_ENV} is set but not who to be: set {TOKEN_ENV}, or {USERNAME_ENV} and "
                                  f"{PASSWORD_ENV}")
        answer = _call("POST", f"{url}/auth/token", {"username": username, "password": password}, token=None)
        return cls(url, str(answer["access_token"]))

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        return _call(method, f"{self.url}/api/v2{path}", body, self.token)

    def asset_id(self, name: str) -> int:
        """The id of the Asset named exactly ``name`` (it exists once a DAG declaring it was parsed)."""
        query = urllib.parse.urlencode({"name_pattern": name, "limit": 100})
        found = [a for a in self.call("GET", f"/assets?{query}")["assets"] if a["name"] == name]
        if not found:
            raise AirflowApiError(f"Airflow at {self.url} has no Asset named {name!r}: is the job's DAG loaded?")
        return int(found[0]["id"])

    def emit(self, name: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Create an event of the Asset ``name`` with ``extra``; Airflow's record of it."""
        return dict(self.call("POST", "/assets/events", {"asset_id": self.asset_id(name), "extra": extra}))


def _call(method: str, url: str, body: dict | None, token: str | None) -> Any:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # the URL is AIRFED_AIRFLOW_URL's, whose scheme from_env checked (http or https)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode(errors="replace")
        raise AirflowApiError(f"{method} {url}: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AirflowApiError(f"{method} {url}: {reason}") from None
