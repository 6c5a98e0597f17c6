"""Airflow's REST API (``/api/v2``) in-process: the real FastAPI app over this process's metadata DB.

A person's answer to a Human-in-the-loop task is what these helpers send, exactly as the UI's
"Required actions" page or a script would: ``PATCH .../taskInstances/<task>/-1/hitlDetails``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class AirflowRest:
    """A client of Airflow's public API, authenticated as ``user`` (a JWT from the auth manager)."""

    def __init__(self, user: str):
        from airflow.api_fastapi.app import create_app, get_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from starlette.testclient import TestClient

        self.client = TestClient(create_app("core"))
        token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=user, role="admin"))
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str, **params: Any) -> Any:
        response = self.client.get(f"/api/v2{path}", params=params, headers=self.headers)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def patch(self, path: str, body: dict) -> Any:
        response = self.client.patch(f"/api/v2{path}", json=body, headers=self.headers)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def pending_hitl(self, dag_id: str) -> list[dict]:
        """Human-in-the-loop requests of ``dag_id`` nobody answered yet."""
        details = self.get(f"/dags/{dag_id}/dagRuns/~/hitlDetails", limit=100)["hitl_details"]
        return [d for d in details if not d.get("response_received")]

    def answer(self, detail: dict, option: str, params_input: dict) -> Any:
        ti = detail["task_instance"]
        path = (f"/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/{ti['task_id']}/"
                f"{ti['map_index']}/hitlDetails")
        return self.patch(path, {"chosen_options": [option], "params_input": params_input})


def answer_when_asked(user: str, dag_id: str, option: str, params_input: dict,
                      timeout: float = 300) -> tuple[threading.Thread, dict]:
    """Start a thread that waits for ``dag_id``'s approval request, then answers it over REST.

    Returns the thread and a dict that receives ``request`` (what the person saw) and ``response``."""
    seen: dict[str, Any] = {}

    def run() -> None:
        try:
            rest = AirflowRest(user)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pending = rest.pending_hitl(dag_id)
                if pending:
                    seen["request"] = pending[0]
                    seen["response"] = rest.answer(pending[0], option, params_input)
                    return
                time.sleep(0.5)
            seen["error"] = f"no approval request in {dag_id} within {timeout}s"
        except BaseException as exc:
            seen["error"] = repr(exc)

    thread = threading.Thread(target=run, name=f"answer-{dag_id}", daemon=True)
    thread.start()
    return thread, seen


@contextmanager
def served_api(user: str) -> Iterator[tuple[str, str]]:
    """Airflow's API app served over HTTP on 127.0.0.1 from a thread, for clients that are not this test's
    (a CLI, another process): (base URL, a JWT of ``user``)."""
    import uvicorn
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    app = create_app("core")
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=user, role="admin"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="airflow-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.should_exit = True
        thread.join(timeout=30)
