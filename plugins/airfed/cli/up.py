"""``airfed up``: Airflow (standalone) and the MLflow UI on the embedded default, every spec in ``dags/`` loaded.

What it does, in order:

1. ``configure(dags_folder=...)``: AIRFED_HOME, the store, MLflow and Airflow's settings in
   ``os.environ``, so every child (Airflow's scheduler, its task processes, the step subprocesses)
   inherits the same store and tracking URI as ``airfed run``.
2. Starts ``mlflow server`` on the SQLite tracking URI (artifacts under ``$AIRFED_HOME/mlartifacts``)
   and ``airflow standalone`` (API server + UI, scheduler, DAG processor, triggerer; examples off;
   the airfed plugin loaded through its entry point), each as its own process group, output in
   ``$AIRFED_HOME/logs/up-*.log``.
3. Meanwhile migrates Airflow's metadata DB and creates missing example silo data for every spec
   (``data.prepare``), as ``airfed run`` does, so a run triggered from the UI or the REST API works on
   a fresh AIRFED_HOME.
4. Waits until both answer, prints the URLs and the Airflow login, and runs until SIGINT/SIGTERM
   (Ctrl-C): then it terminates both process groups, waits, and kills what is left after a timeout;
   finally it stops the warm step servers of this AIRFED_HOME (``$AIRFED_HOME/run``, or
   ``AIRFED_WARM_DIR``), which Airflow's task processes started and which live in their own
   sessions (one server per step interpreter and env, shared by every task process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

DEFAULT_AIRFLOW_PORT = 8080
DEFAULT_MLFLOW_PORT = 5000
#: Forwarded as-is; workers=1 keeps the two shared CPUs for the scheduler and the steps.
MLFLOW_WORKERS = "1"
#: MLflow's server-side jobs (GenAI prompt optimisation, scorers, trace roll-ups) run in huey consumer
#: processes the server starts by default: eight more interpreters importing MLflow (~3 s of CPU
#: each at start, measured). airfed uses none of them; an explicit MLFLOW_SERVER_ENABLE_JOB_EXECUTION wins.
MLFLOW_SERVER_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
PASSWORD_FILE_NAME = "simple_auth_manager_passwords.json.generated"


@dataclass
class Child:
    """A server started in its own process group, its output going to ``log``."""

    name: str
    argv: list[str]
    log: Path
    #: variables it gets unless the environment sets them
    env_defaults: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"\n==== airfed up: {' '.join(self.argv)} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self.env_defaults, **env}, cwd=cwd,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_alive(self) -> bool:
        if self.proc is None:
            return False
        self.proc.poll()  # reap the leader if it exited
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - a reused pgid owned by someone else
            return False
        return True

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_children(children: list[Child], timeout: float, out: TextIO) -> None:
    """SIGTERM every process group, wait up to ``timeout`` seconds, then SIGKILL what is left."""
    for child in children:
        if child.group_alive():
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(c.group_alive() for c in children):
        time.sleep(0.2)
    for child in children:
        if child.group_alive():
            print(f"airfed: {child.name} did not stop within {timeout:.0f}s; killing it", file=out, flush=True)
            child.signal_group(signal.SIGKILL)
    for child in children:
        if child.proc is not None:
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass


def stop_warm_servers(timeout: float, out: TextIO) -> None:
    """Stop the warm step servers of this AIRFED_HOME (the step env's run directory)."""
    from fl_tasks.warm import stop_servers
    from fl_tasks.warm.protocol import run_dir

    pids = stop_servers(run_dir(dict(os.environ)), timeout=timeout)
    if pids:
        print(f"airfed: stopped {len(pids)} warm step server(s)", file=out, flush=True)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((connect_host(host), port)) == 0


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost") else host


def redact(uri: str) -> str:
    """``uri`` without a password (database and server URIs may carry one)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we built
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, b""


def airflow_ready(base: str) -> bool:
    """The API server answers and the scheduler and DAG processor heartbeat."""
    status, body = http_get(f"{base}/api/v2/monitor/health")
    if status != 200:
        return False
    try:
        health = json.loads(body)
    except ValueError:
        return False
    required = ["metadatabase", "scheduler"] + (["dag_processor"] if "dag_processor" in health else [])
    return all((health.get(component) or {}).get("status") == "healthy" for component in required)


def mlflow_ready(base: str) -> bool:
    return http_get(f"{base}/health")[0] == 200


def airflow_login(airflow_home: Path) -> tuple[str, str | None]:
    """(how to log in, the passwords file) for Airflow 3's SimpleAuthManager."""
    from airflow.configuration import conf

    if conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False):
        return "no login needed (simple_auth_manager_all_admins)", None
    path = conf.get("core", "simple_auth_manager_passwords_file", fallback=None) or str(
        airflow_home / PASSWORD_FILE_NAME
    )
    try:
        passwords = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return f"see {path}", path
    users = [u.split(":")[0] for u in conf.get("core", "simple_auth_manager_users", fallback="admin:admin").split(",")]
    pairs = [f"{u} / {passwords[u]}" for u in users if u in passwords]
    return (", ".join(pairs) or f"see {path}"), path


def report_exited(children: list[Child], when: str, out: TextIO) -> bool:
    """Print the log tail of every child server that has exited; True if any has."""
    dead = [c for c in children if not c.running()]
    for child in dead:
        print(f"airfed: {child.name} exited {when} (code {child.proc.returncode if child.proc else None}); "
              f"last lines of {child.log}:\n{child.tail()}", file=out, flush=True)
    return bool(dead)


def prepare_all_data(dags: Path, out: TextIO) -> list[str]:
    """Create missing silo data (``data.prepare``) for every valid spec; return the job names."""
    from airfed.environment import DataPreparationFailed, prepare_silo_data
    from airfed.spec import SpecError, find_specs, load_spec
    from fl_tasks.paths import expand_path

    jobs = []
    for path in find_specs(dags):
        try:
            spec = load_spec(path)
        except SpecError as exc:
            print(f"airfed: {path.name} is invalid (Airflow lists it under DAG import errors):", file=out)
            for problem in exc.problems:
                print(f"  {problem}", file=out)
            continue
        jobs.append(spec.job)
        missing = [s.name for s in spec.silos if not Path(expand_path(s.data)).exists()]
        if not missing or not spec.data.prepare:
            continue
        print(f"airfed: preparing silo data for {spec.job} ({', '.join(missing)})", file=out, flush=True)
        try:
            prepare_silo_data(spec, out)
        except DataPreparationFailed as exc:
            print(f"airfed: warning: {exc}", file=out, flush=True)
    return jobs


def up(
    dags: str | None,
    airflow_port: int = DEFAULT_AIRFLOW_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    host: str = "127.0.0.1",
    startup_timeout: float = 900.0,
    stop_timeout: float = 30.0,
) -> int:
    out = sys.stdout
    dags_folder = Path(dags or "dags").expanduser().resolve()
    if not dags_folder.is_dir():
        print(f"airfed: no DAGs folder at {dags_folder}; run from the project root or pass --dags DIR", file=out)
        return 2
    os.environ.pop("AIRFED_SPECS", None)  # an `airfed run` setting: never narrow the loader here

    from airfed.environment import configure

    chosen = configure(dags_folder=dags_folder)
    home, airflow_home = Path(chosen["AIRFED_HOME"]), Path(chosen["AIRFLOW_HOME"])
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    local_mlflow = not tracking_uri.startswith(("http://", "https://", "databricks"))
    client_host = connect_host(host)
    airflow_url = f"http://localhost:{airflow_port}"
    if local_mlflow:
        mlflow_url = f"http://localhost:{mlflow_port}"
    else:
        from airfed.ui.links import mlflow_ui_url

        mlflow_url = mlflow_ui_url(tracking_uri)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__API__HOST"] = host
    os.environ["AIRFLOW__API__PORT"] = str(airflow_port)
    os.environ.setdefault("AIRFLOW__API__BASE_URL", airflow_url)
    # Task processes talk to the API server's execution API; loopback by address, not by name.
    os.environ.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://{client_host}:{airflow_port}/execution/")
    os.environ.setdefault("MLFLOW_UI_URL", mlflow_url)  # the extra links and the FL jobs page
    # Task processes start while the API server is still warming up on a small machine: Airflow's 5s
    # default makes the first tasks of a run fail with ReadTimeout before they ever start.
    os.environ.setdefault("AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT", "60")
    # `airflow standalone` starts its components as `airflow ...`: this interpreter's scripts first.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bindir, *[p for p in os.environ.get("PATH", "").split(os.pathsep) if p]])

    busy = [p for p in ([airflow_port] + ([mlflow_port] if local_mlflow else [])) if port_in_use(host, p)]
    if busy:
        print(f"airfed: port(s) {', '.join(map(str, busy))} already in use; stop what runs there or pass "
              "--airflow-port / --mlflow-port", file=out)
        return 2

    logs = home / "logs"
    artifacts = home / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    if local_mlflow:
        children.append(Child("mlflow", [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", tracking_uri,
            "--artifacts-destination", str(artifacts),
            "--host", host, "--port", str(mlflow_port), "--workers", MLFLOW_WORKERS,
        ], logs / "up-mlflow.log", env_defaults=MLFLOW_SERVER_DEFAULTS))
    airflow = Child("airflow", [sys.executable, "-m", "airflow", "standalone"], logs / "up-airflow.log")

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"airfed: up | AIRFED_HOME {home} | DAGs {dags_folder}", file=out, flush=True)
        cwd = Path.cwd()
        for child in children:
            child.start(dict(os.environ), cwd)
        # Migrate before standalone starts (its own initdb is then a no-op), output to the log.
        from airfed.cli.terminal import output_to_log
        from airfed.environment import migrate_airflow_db

        print("airfed: migrating Airflow's metadata DB ...", file=out, flush=True)
        with output_to_log(airflow.log):
            migrate_airflow_db()
        if stop.is_set():
            return 0
        airflow.start(dict(os.environ), cwd)
        children.append(airflow)
        jobs = prepare_all_data(dags_folder, out)
        print(f"airfed: starting Airflow on {airflow_url}" + (f" and MLflow on {mlflow_url}" if local_mlflow else "")
              + f" (logs: {logs}/up-*.log) ...", file=out, flush=True)

        deadline = time.monotonic() + startup_timeout
        api = f"http://{client_host}:{airflow_port}"
        mlflow_api = f"http://{client_host}:{mlflow_port}"
        ready = {"airflow": False, "mlflow": not local_mlflow}
        while not stop.is_set() and not all(ready.values()):
            if report_exited(children, "during startup", out):
                return 1
            if time.monotonic() > deadline:
                waiting = ", ".join(name for name, ok in ready.items() if not ok)
                print(f"airfed: {waiting} did not become ready within {startup_timeout:.0f}s; see {logs}/up-*.log",
                      file=out, flush=True)
                return 1
            ready["airflow"] = ready["airflow"] or airflow_ready(api)
            ready["mlflow"] = ready["mlflow"] or mlflow_ready(mlflow_api)
            stop.wait(1.0)
        if stop.is_set():
            return 0

        login, password_file = airflow_login(airflow_home)
        lines = [
            "airfed: ready",
            f"  Airflow UI:  {airflow_url}   login: {login}",
            f"  FL jobs:     {airflow_url}/airfed/   (JSON: {airflow_url}/airfed/api/jobs)",
            f"  MLflow UI:   {mlflow_url}   (tracking {redact(tracking_uri)}"
            + (f", artifacts {artifacts})" if local_mlflow else ")"),
            f"  jobs:        {', '.join(jobs) or 'none'} (DAGs in {dags_folder})",
            f"  REST API:    {airflow_url}/api/v2 (bearer token from POST {airflow_url}/auth/token; see README)",
            f"  logs:        {', '.join(str(c.log) for c in children)}",
        ]
        if password_file:
            lines.append(f"  passwords:   {password_file}")
        lines.append("airfed: press Ctrl-C to stop Airflow and MLflow")
        print("\n".join(lines), file=out, flush=True)

        while not stop.is_set():
            if report_exited(children, "unexpectedly", out):
                return 1
            stop.wait(1.0)
        return 0
    finally:
        if received:
            print(f"\nairfed: {signal.Signals(received[0]).name} received, stopping "
                  f"{' and '.join(c.name for c in children) or 'nothing'} ...", file=out, flush=True)
        stop_children(children, stop_timeout, out)
        stop_warm_servers(stop_timeout, out)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("airfed: stopped", file=out, flush=True)


def up_command(ns: argparse.Namespace) -> int:
    return up(ns.dags, ns.airflow_port, ns.mlflow_port, ns.host, ns.startup_timeout, ns.stop_timeout)


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up", help="Airflow (standalone) and the MLflow UI on the embedded default; prints URLs and login",
        description="Start Airflow standalone (UI, scheduler, DAG processor, triggerer) with every job spec in the "
                    "DAGs folder loaded, and the MLflow UI on the same tracking store; Ctrl-C stops both.",
    )
    parser.add_argument("--dags", default=None, help="DAGs folder with the job specs (default: ./dags)")
    parser.add_argument("--airflow-port", type=int, default=DEFAULT_AIRFLOW_PORT, help="Airflow UI/API port")
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT, help="MLflow UI port")
    parser.add_argument("--host", default="127.0.0.1", help="interface both servers bind to (default: 127.0.0.1)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for both to answer")
    parser.add_argument("--stop-timeout", type=float, default=30.0,
                        help="seconds to wait after SIGTERM before killing the servers")
    parser.set_defaults(func=up_command)
