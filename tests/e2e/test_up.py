"""``airfed up``: real Airflow standalone + real MLflow server, a run triggered through the REST API.

One ``airfed up`` process on a fresh AIRFED_HOME and free ports serves the whole module: the digits
DAG is triggered with ``POST /api/v2/dags/digits/dagRuns`` and must succeed like ``airfed run``; then
the registry, the plugin's FL jobs page (JSON + HTML), the register task's extra links (resolved on
the MLflow server) and a headless Chromium screenshot of the page are checked; finally SIGINT must
stop both servers and everything they started.

The DAGs folder (``airfed up --dags``) is the project's loader with the example job cut to 2 silos,
1 local epoch and no schedule (``helpers.small_example_spec``): the scheduler runs exactly the two
triggered rounds, and nothing else, while the servers are under test.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, small_example_spec

sys.path.insert(0, str(REPO / "images"))
from rehearse import processes_with_env

SCREENSHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
STARTUP_TIMEOUT = 600
RUN_TIMEOUT = 900
SILOS = ("us", "eu")
#: steps at once (Airflow's parallelism; the default is the machine's cores): a round's silos side by side
PARALLELISM = len(SILOS)
#: a round's steps: distribute, train/validate/evaluate per silo, aggregate, register
STEPS_PER_ROUND = 3 + 3 * len(SILOS)

#: one `airfed up` shared by the module's tests: keep them on one xdist worker, in file order
pytestmark = pytest.mark.xdist_group("up")


# -- helpers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def request(method: str, url: str, body: dict | None = None, token: str | None = None,
            timeout: float = 60) -> tuple[int, bytes, dict]:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # see redirects as they are
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get_json(url: str, token: str | None = None) -> dict:
    status, body, _ = request("GET", url, token=token)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


def processes_with_home(home: Path) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose environment has AIRFED_HOME=<home> (all descendants)."""
    return processes_with_env("AIRFED_HOME", str(home))


class Up:
    """The running ``airfed up`` and what it printed."""

    def __init__(self, home: Path, airflow_port: int, mlflow_port: int, dags: Path):
        self.home, self.airflow_port, self.mlflow_port = home, airflow_port, mlflow_port
        self.airflow = f"http://127.0.0.1:{airflow_port}"
        self.mlflow = f"http://127.0.0.1:{mlflow_port}"
        self.log = home.parent / "airfed-up.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_", "MLFLOW_", "AIRFLOW"))}
        env.update(AIRFED_HOME=str(home), PYTHONUNBUFFERED="1", AIRFED_PARALLELISM=str(PARALLELISM))
        self.out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airfed.cli", "up", "--dags", str(dags),
             "--airflow-port", str(airflow_port), "--mlflow-port", str(mlflow_port)],
            cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.token: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while "press Ctrl-C" not in self.output():
            assert self.proc.poll() is None, f"airfed up exited early:\n{self.output()[-5000:]}"
            assert time.monotonic() < deadline, f"airfed up not ready after {timeout}s:\n{self.output()[-5000:]}"
            time.sleep(2)

    def login(self) -> tuple[str, str]:
        match = re.search(r"login: (\S+) / (\S+)", self.output())
        assert match, self.output()
        return match.group(1), match.group(2)

    def stop(self, timeout: float = 120) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.out.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    root = tmp_path_factory.mktemp("up")
    home, dags = root / "home", root / "dags"
    small_example_spec(dags, silos=SILOS, epochs=1, schedule=None)
    shutil.copy(REPO / "dags" / "airfed_dags.py", dags)
    server = Up(home, free_port(), free_port(), dags)
    try:
        server.wait_ready(STARTUP_TIMEOUT)
        yield server
    finally:
        server.stop()
        for pid, cmdline in processes_with_home(home):  # never leave servers behind, even on failure
            print(f"killing left-over process {pid}: {cmdline}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def token(up) -> str:
    user, password = up.login()
    status, body, _ = request("POST", f"{up.airflow}/auth/token", {"username": user, "password": password})
    assert status in (200, 201), body
    up.token = json.loads(body)["access_token"]
    return up.token


def wait_for_run(up, token, run_id: str, timeout: float) -> dict:
    """Poll DAG run ``run_id`` of digits until it exists and finished; fail naming unsuccessful tasks."""
    quoted = urllib.parse.quote(run_id, safe="")
    deadline = time.monotonic() + timeout
    while True:
        status, body, _ = request("GET", f"{up.airflow}/api/v2/dags/digits/dagRuns/{quoted}", token=token)
        run = json.loads(body) if status == 200 else {"state": f"absent ({status})"}
        if run["state"] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, f"run {run_id} still {run['state']} after {timeout}s"
        time.sleep(5)
    if run["state"] != "success":
        tis = get_json(f"{up.airflow}/api/v2/dags/digits/dagRuns/{quoted}/taskInstances?limit=200", token)
        failed = [(t["task_id"], t["map_index"], t["state"]) for t in tis["task_instances"]
                  if t["state"] not in ("success", "skipped")]
        pytest.fail(f"run {run_id} {run['state']}; tasks not successful: {failed}")
    return {"run_id": run_id, "quoted": quoted, "run": run}


@pytest.fixture(scope="module")
def triggered(up, token) -> dict:
    """The digits DAG triggered through the REST API with rounds=2: the run performs round one and its
    ``next_round`` task triggers the second run, which the real scheduler runs. Waited for until both
    finish; the last run is the fixture's ``run_id``, the first its ``first``."""
    deadline = time.monotonic() + 300
    while True:  # the DAG processor parses dags/ right after start
        status, body, _ = request("GET", f"{up.airflow}/api/v2/dags/digits", token=token)
        if status == 200:
            break
        assert time.monotonic() < deadline, f"DAG digits never appeared: {status} {body[:300]}"
        time.sleep(3)
    assert json.loads(body)["is_paused"] is False
    status, body, _ = request(
        "POST", f"{up.airflow}/api/v2/dags/digits/dagRuns", {"logical_date": None, "conf": {"rounds": 2}}, token
    )
    assert status == 200, body
    first = wait_for_run(up, token, json.loads(body)["dag_run_id"], RUN_TIMEOUT)
    second = wait_for_run(up, token, f"{first['run_id']}__rounds_left_1", RUN_TIMEOUT)
    return {**second, "first": first}


# -- tests -----------------------------------------------------------------------------------------
def test_up_prints_urls_and_login_and_both_answer(up, token):
    out = up.output()
    assert f"Airflow UI:  http://localhost:{up.airflow_port}" in out
    assert f"MLflow UI:   http://localhost:{up.mlflow_port}" in out
    assert f"FL jobs:     http://localhost:{up.airflow_port}/airfed/" in out
    assert "login: admin / " in out
    assert request("GET", f"{up.mlflow}/health")[0] == 200
    # MLflow's server-side jobs are off: no huey consumer processes (airfed uses none of those jobs)
    assert not [cmd for _, cmd in processes_with_home(up.home) if "huey" in cmd]
    health = get_json(f"{up.airflow}/api/v2/monitor/health")
    assert health["scheduler"]["status"] == "healthy"
    # the plugin is loaded from its entry point: the FL jobs view is in the UI's navigation
    plugins = get_json(f"{up.airflow}/api/v2/plugins", token)["plugins"]
    airfed = next(p for p in plugins if p["name"] == "airfed")
    assert airfed["external_views"][0]["href"] == "/airfed/"
    assert airfed["fastapi_apps"][0]["url_prefix"] == "/airfed"


def test_rest_triggered_rounds_chain_two_runs_and_register_both(up, token, triggered):
    from mlflow import MlflowClient

    first, second = triggered["first"], triggered
    all_runs = get_json(f"{up.airflow}/api/v2/dags/digits/dagRuns?order_by=run_after&limit=100", token)["dag_runs"]
    runs = [r for r in all_runs if first["run_id"] in (r["dag_run_id"], (r["conf"] or {}).get("chain_id"))]
    assert [r["dag_run_id"] for r in runs] == [first["run_id"], second["run_id"]]  # rounds=2: no third run
    assert runs == all_runs  # no schedule: nothing but the chain ran
    assert runs[1]["run_after"] == runs[0]["run_after"]  # the chain keeps its place in the queue
    assert runs[1]["run_type"] == "operator_triggered", runs[1]
    assert runs[1]["conf"] == {"rounds": 1, "training": runs[1]["conf"]["training"], "chain_id": first["run_id"]}
    # round one: every step and the trigger ran; round two: every step ran, next_round skipped
    for run, last in ((first, "success"), (second, "skipped")):
        tis = get_json(f"{up.airflow}/api/v2/dags/digits/dagRuns/{run['quoted']}/taskInstances?limit=100", token)
        states: dict[str, set] = {}
        for ti in tis["task_instances"]:
            states.setdefault(ti["task_id"], set()).add(ti["state"])
        assert states.pop("next_round") == {last}, tis
        assert sorted(states) == ["aggregate", "distribute", "evaluate", "model_event", "register", "train",
                                  "validate"]
        assert all(s == {"success"} for s in states.values()), states

    registry = up.home / "store" / "digits" / "rounds"
    records = [json.loads(p.read_text()) for p in sorted(registry.glob("*/registry.json"))]
    ours = [r for r in records if r["dag_run_id"] in (first["run_id"], second["run_id"])]
    assert [r["dag_run_id"] for r in ours] == [first["run_id"], second["run_id"]], ours
    assert ours[1]["round"] == ours[0]["round"] + 1
    for rec in ours:
        assert sorted(rec["accepted"]) == sorted(SILOS) and rec["rejected"] == {}
    head = json.loads((up.home / "store" / "digits" / "HEAD.json").read_text())
    assert head["round"] == ours[1]["round"] == max(r["round"] for r in records)

    client = MlflowClient(tracking_uri=f"sqlite:///{up.home / 'mlflow.db'}")
    versions = client.search_model_versions("name='digits-mlp'")
    assert len(versions) == len(records) >= 2
    for rec in ours:
        version = client.get_model_version("digits-mlp", str(rec["registry_version"]))
        assert version.tags["dag_run_id"] == rec["dag_run_id"] and version.tags["round"] == str(rec["round"])
    # one MLflow parent run for the chain, named by its first run
    assert ours[0]["mlflow_parent_run_id"] == ours[1]["mlflow_parent_run_id"]
    parent = client.get_run(ours[0]["mlflow_parent_run_id"])
    assert parent.data.tags["airfed.dag_run_id"] == first["run_id"]
    rec = ours[1]
    assert str(client.get_model_version_by_alias("digits-mlp", "champion").version) == str(rec["champion_version"])


def test_task_processes_share_one_warm_step_server(up, token, triggered):
    """Each task runs in its own supervised process; all of them fork their steps from one warm server."""
    from fl_tasks.warm.launch import request_op

    sockets = sorted((up.home / "run").glob("warm-*.sock"))
    assert len(sockets) == 1, sockets
    status = request_op(sockets[0], "ping")
    assert status["requests"] >= 2 * STEPS_PER_ROUND, status  # both rounds' steps (and the data preparation)
    assert status["python_threads"] == 1 and status["children"] == []


def test_silo_tasks_are_dispatched_side_by_side(up, token, triggered):
    """LocalExecutor with ``parallelism`` = AIRFED_PARALLELISM (default: the cores; 2 here): the
    scheduler hands a round's mapped silo tasks to the executor together, each silo step's second
    task before the first finished (with parallelism 1 it would wait for a free slot). Whether their
    runs then overlap in time depends on how fast each task process starts, so that is not asserted."""
    from datetime import datetime

    for run in (triggered["first"], triggered):
        tis = get_json(f"{up.airflow}/api/v2/dags/digits/dagRuns/{run['quoted']}/taskInstances?limit=100",
                       token)["task_instances"]
        for step in ("train", "validate", "evaluate"):
            silo_tis = [t for t in tis if t["task_id"] == step]
            assert len(silo_tis) == len(SILOS), (step, silo_tis)
            queued = [datetime.fromisoformat(t["queued_when"]) for t in silo_tis]
            ended = [datetime.fromisoformat(t["end_date"]) for t in silo_tis]
            assert max(queued) < min(ended), (run["run_id"], step, queued, ended)


def test_jobs_page_json_and_html(up, token, triggered):
    status, body, _ = request("GET", f"{up.airflow}/airfed/api/jobs")
    assert status == 401, body  # a login is needed
    status, _, headers = request("GET", f"{up.airflow}/airfed/")
    assert status in (302, 303, 307) and "/auth/login" in headers["location"]

    data = get_json(f"{up.airflow}/airfed/api/jobs", token)
    job = next(j for j in data["jobs"] if j["job"] == "digits")
    assert job["error"] is None and data["problems"] == []
    assert job["silos"] == list(SILOS) and job["registry_model"] == "digits-mlp"
    ours = [r for r in job["rounds"] if r["dag_run_id"] == triggered["run_id"]]
    assert len(ours) == 1
    row = ours[0]
    assert row["status"] == "registered" and row["accepted"] == sorted(SILOS)
    assert 0.0 <= row["metrics"]["accuracy"] <= 1.0
    assert job["head_round"] == row["round"] and job["champion_version"] == row["champion_version"]
    assert row["links"]["mlflow_run"].startswith(f"http://localhost:{up.mlflow_port}/#/experiments/")
    assert row["links"]["model_version"] == (
        f"http://localhost:{up.mlflow_port}/#/models/digits-mlp/versions/{row['registry_version']}"
    )
    assert get_json(f"{up.airflow}/airfed/api/jobs/digits", token)["job"] == "digits"

    status, body, headers = request("GET", f"{up.airflow}/airfed/", token=token)
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "Federated learning jobs" in page and "digits" in page and "digits-mlp" in page
    assert row["links"]["model_version"] in page


def test_register_task_extra_links_resolve_on_the_mlflow_server(up, token, triggered):
    links_url = (f"{up.airflow}/api/v2/dags/digits/dagRuns/{triggered['quoted']}"
                 "/taskInstances/register/links")
    links = get_json(links_url, token)["extra_links"]
    run_link, model_link = links["MLflow round run"], links["Registered model version"]
    assert run_link and model_link, links
    prefix = f"http://localhost:{up.mlflow_port}/#/"
    assert run_link.startswith(prefix) and model_link.startswith(prefix)

    exp_id, run_id = re.fullmatch(r".*/#/experiments/([^/]+)/runs/([0-9a-f]+)", run_link).groups()
    run = get_json(f"{up.mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert run["info"]["experiment_id"] == exp_id
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["mlflow.parentRunId"]
    name, version = re.fullmatch(r".*/#/models/([^/]+)/versions/(\d+)", model_link).groups()
    mv = get_json(f"{up.mlflow}/api/2.0/mlflow/model-versions/get?name={name}&version={version}")["model_version"]
    assert mv["run_id"] == run_id
    # the UI pages themselves (the SPA shell) and a logged artifact resolve on the same server
    assert request("GET", run_link.replace("localhost", "127.0.0.1").split("#")[0])[0] == 200
    status, png, _ = request(
        "GET", f"{up.mlflow}/get-artifact?path=plots/convergence.png&run_uuid={run_id}"
    )
    assert status == 200 and png.startswith(b"\x89PNG"), (status, png[:200])
    # tasks that finish before their round is registered have no link
    early = get_json(links_url.replace("/register/", "/distribute/"), token)["extra_links"]
    assert not early.get("MLflow round run")


def test_screenshot_of_the_jobs_page(up, token, triggered):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); no screenshot taken")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / "airfed-jobs.png"
    text = chromium_screenshot(f"http://localhost:{up.airflow_port}/airfed/", token, target)
    assert "Federated learning jobs" in text and "digits" in text, text[:2000]
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1200 and height >= 400, (width, height)

    # the same page inside the Airflow UI: the plugin's top-level "FL jobs" navigation entry
    nav = chromium_screenshot(f"http://localhost:{up.airflow_port}/plugin/airfed", token,
                              SCREENSHOTS / "airfed-in-airflow-ui.png", wait_for="FL jobs", settle=5)
    assert "FL jobs" in nav and "Dags" in nav, nav[:2000]


def test_sigint_stops_both_servers(up, token):
    code = up.stop()
    assert code == 0, up.output()[-3000:]
    out = up.output()
    assert "SIGINT received" in out and "airfed: stopped" in out
    assert not port_open(up.airflow_port) and not port_open(up.mlflow_port)
    deadline = time.monotonic() + 30
    while (left := processes_with_home(up.home)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left


# -- headless Chromium over the DevTools protocol ------------------------------------------------
def chromium_screenshot(url: str, token: str, out: Path, width: int = 1440, height: int = 900,
                       wait_for: str | None = None, settle: float = 0.0) -> str:
    """Open ``url`` logged in (Airflow's ``_token`` cookie), save a full-page PNG, return the page text.

    ``wait_for``: text to wait for in the page (a client-rendered app); ``settle``: seconds more."""
    import websocket  # websocket-client (a dependency of the kubernetes client)

    profile = Path(tempfile.mkdtemp(prefix="airfed-chromium-"))
    port = free_port()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
         f"--remote-debugging-port={port}", "--remote-allow-origins=*", f"--window-size={width},{height}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5).read())
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                assert time.monotonic() < deadline, "chromium's DevTools endpoint did not come up"
                time.sleep(0.5)
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        ids = iter(range(1, 10_000))

        def call(method: str, **params):
            msg_id = next(ids)
            ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == msg_id:
                    assert "error" not in msg, (method, msg["error"])
                    return msg.get("result", {})

        def wait_event(name: str, timeout: float = 60):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                msg = json.loads(ws.recv())
                if msg.get("method") == name:
                    return msg
            raise AssertionError(f"no {name} within {timeout}s")

        parsed = urllib.parse.urlsplit(url)
        call("Network.enable")
        call("Network.setCookie", name="_token", value=token, domain=parsed.hostname, path="/")
        call("Page.enable")
        call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        call("Page.navigate", url=url)
        wait_event("Page.loadEventFired")

        def page_text() -> str:
            return call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)["result"]["value"]

        text = page_text()
        end = time.monotonic() + 90
        while wait_for and wait_for not in text and time.monotonic() < end:
            time.sleep(1)
            text = page_text()
        time.sleep(settle)
        content = call("Page.getLayoutMetrics")["cssContentSize"]
        full_height = max(height, int(content["height"]))
        call("Emulation.setDeviceMetricsOverride", width=width, height=full_height, deviceScaleFactor=1, mobile=False)
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        ws.close()
        return text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(profile, ignore_errors=True)
