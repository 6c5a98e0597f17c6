"""``make rehearse``: the deployed form of airfed, on this machine, end to end.

What a Kubernetes deployment runs, stood in for piece by piece:

- the two images' Python environments, built by ``images/install_env.py`` as the Dockerfiles build
  them (``airfed[airflow]`` and ``airfed[steps]`` under ``constraints.txt``; with uv where the
  Dockerfiles use pip, the install script's pin check holding both to the same set), each in its own
  virtualenv under ``.rehearse/`` (reused while ``pyproject.toml``, ``constraints.txt`` and the install
  script are unchanged; airfed itself is reinstalled whenever its sources changed);
- MinIO: moto's S3 server on 127.0.0.1, holding the store and MLflow's artifacts;
- the MLflow deployment: ``mlflow server`` (SQLite backend, artifacts proxied to S3), from the tools
  environment running this script (the dev venv: the fl-task image carries only the MLflow client);
- the Airflow deployment: ``airflow api-server``, ``scheduler`` and ``dag-processor`` from the Airflow
  environment (LocalExecutor, SQLite), the DAGs folder staged as the Airflow image's ``COPY dags/``;
- the fl-task pods: the local runner executes each step's exact argv and env with the step
  environment's interpreter (``AIRFED_STEP_PYTHON``).

Then it smoke-tests both environments, triggers the digits job through the REST API and checks the
outcome: every DAG run of the job succeeded, HEAD reached the requested round in the bucket, the
updates and reports are there, the MLflow server holds one registry version per round, a champion
and the convergence plot, the FL jobs page shows the rounds read from S3, every extra link resolves,
and ``airfed verify --all`` recomputes the committed history from S3 in the step environment. It
prints a one-line summary and stops everything it started, also on failure.

Stdlib only: it runs under any Python 3.11 (``make rehearse`` uses the dev venv's, which also
provides moto and the MLflow server).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
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
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import install_env  # the same script the Dockerfiles call

REPO = install_env.PROJECT
CACHE = REPO / ".rehearse"
SIDES = ("airflow", "steps")
JOB = "digits"
SPEC = REPO / "dags" / f"{JOB}.yaml"
STORE_BUCKET = "airfed-store"
STORE_PREFIX = "rehearsal"
STORE_URL = f"s3://{STORE_BUCKET}/{STORE_PREFIX}"
MLFLOW_BUCKET = "airfed-mlflow"
#: The MLflow server as the Helm chart runs it: without MLflow's server-side jobs (their eight huey
#: consumer processes; airfed uses none of those jobs)
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
#: Env var every process the rehearsal starts carries (children inherit it): what is left is found and stopped.
MARKER_ENV = "AIRFED_REHEARSAL"
#: Variables of the caller's environment that must not leak into the deployment's processes.
CLEARED_PREFIXES = ("AIRFED_", "AIRFLOW", "MLFLOW_", "AWS_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE")
STARTUP_TIMEOUT = 600
RUN_TIMEOUT = 1200


class RehearsalFailed(AssertionError):
    """The deployed form did not do what it must (the message says what, with log excerpts)."""


def say(message: str) -> None:
    print(f"rehearse: {message}", flush=True)


def check(condition: object, message: str | Callable[[], str]) -> None:
    if not condition:
        raise RehearsalFailed(message() if callable(message) else message)


# -- the two environments ---------------------------------------------------------------------------
@dataclass
class Env:
    """One side's virtualenv under the cache, as its image would hold it."""

    side: str
    root: Path
    seconds: float = 0.0
    cached: bool = False

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def bin(self) -> Path:
        return self.root / "bin"


def inputs_hash(side: str, project: Path = REPO) -> str:
    """What a side's dependencies depend on: the declarations, the pins, the install script, the interpreter."""
    digest = hashlib.sha256(f"{side}\0{sys.version_info[:2]}\0".encode())
    for name in ("pyproject.toml", "constraints.txt", "images/install_env.py"):
        digest.update(name.encode() + b"\0" + (project / name).read_bytes())
    return digest.hexdigest()[:12]


#: What ``install_env.py --project-only`` installs of airfed (pyproject's package dirs) and its metadata.
PROJECT_SOURCES = ("pyproject.toml", "plugins/airfed", "fl_tasks", "examples")


def sources_hash(project: Path = REPO) -> str:
    """The airfed sources an environment holds: while unchanged, a reused environment is not reinstalled
    (a second rehearsal in one test session, e.g. the fault mode's, costs no install)."""
    digest = hashlib.sha256()
    for top in PROJECT_SOURCES:
        root = project / top
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock, so a test run and a ``make rehearse`` never build the same env at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_env(side: str, cache: Path = CACHE) -> Env:
    """The side's env: built once per inputs hash with ``install_env.py install``; airfed reinstalled when its
    sources changed (``sources_hash``)."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit(f"rehearse: needs Python 3.11 (the images' interpreter), not {sys.version.split()[0]}")
    env = Env(side, cache / f"{side}-{inputs_hash(side)}")
    log = cache / f"{env.root.name}.log"
    started = time.monotonic()
    with locked(cache / f"{side}.lock"):
        env.cached = (env.root / ".complete").exists()
        sources, installed = sources_hash(), env.root / ".sources"
        script = [sys.executable, install_env.__file__, "install", side]
        if env.cached:
            argv = [*script, "--python", env.python, "--project-only"]
        else:
            shutil.rmtree(env.root, ignore_errors=True)
            argv = [*script, "--venv", str(env.root)]
        if not (env.cached and installed.exists() and installed.read_text() == sources):
            installed.unlink(missing_ok=True)  # an install cut short must not look complete
            with open(log, "w") as out:
                proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=clean_env())
            if proc.returncode != 0:
                raise RehearsalFailed(f"building the {side} environment failed (exit {proc.returncode}); "
                                      f"last lines of {log}:\n{tail(log, 30)}")
            installed.write_text(sources)
        (env.root / ".complete").touch()
        for stale in cache.glob(f"{side}-*"):  # older inputs: never used again
            if stale.is_dir() and stale != env.root:
                shutil.rmtree(stale, ignore_errors=True)
                stale.with_suffix(".log").unlink(missing_ok=True)
    env.seconds = time.monotonic() - started
    say(f"{side} environment {'reused' if env.cached else 'built'} in {env.seconds:.0f}s: {env.root}")
    return env


def build_envs(cache: Path = CACHE) -> dict[str, Env]:
    return {side: build_env(side, cache) for side in SIDES}


def check_apart(envs: dict[str, Env]) -> dict[str, list[str]]:
    """Neither environment holds the other side's packages (install_env.FORBIDDEN); their packages."""
    found = {}
    for side, env in envs.items():
        present = install_env.installed(env.python)
        wrong = sorted(set(present) & set(install_env.FORBIDDEN[side]))
        check(not wrong, f"the {side} environment contains {', '.join(wrong)}")
        found[side] = present
    return found


# -- processes --------------------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without airfed/Airflow/MLflow/AWS/Python settings or any venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_PREFIXES)}
    venv = os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else None)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not (venv and p.startswith(venv))]
    env["PATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


@dataclass
class Service:
    """A server in its own process group, output to ``log``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, cwd: Path) -> Service:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=cwd, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def group_alive(self) -> bool:
        if self.proc is None:
            return False
        self.proc.poll()
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def processes_with_env(name: str, value: str) -> list[tuple[int, str]]:
    """(pid, command line) of live, non-zombie processes whose environment has ``name=value`` (whatever
    session they run in): how everything a deployment started is found, even a step in its own session."""
    needle = f"{name}={value}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes() + b"\0":
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append((int(proc.name), cmdline.strip()))
        except OSError:
            continue
    return found


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """The processes of this rehearsal (they carry ``MARKER_ENV=marker``)."""
    return processes_with_env(MARKER_ENV, marker)


def stop_all(services: list[Service], marker: str, timeout: float = 30.0) -> list[str]:
    """SIGTERM every group (newest first), wait, SIGKILL the rest, then anything still marked; what was killed."""
    for service in reversed(services):
        if service.group_alive():
            service.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(s.group_alive() for s in services):
        time.sleep(0.3)
    killed = []
    for service in services:
        if service.group_alive():
            killed.append(service.name)
            service.signal_group(signal.SIGKILL)
        if service.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.proc.wait(timeout=10)
    for _ in range(3):
        left = marked_processes(marker)
        if not left:
            break
        for pid, cmdline in left:
            killed.append(f"{pid} {cmdline[:120]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    return killed


def stop_warm_servers(warm_dir: Path) -> list[int]:
    """Stop the warm step servers listening in ``warm_dir`` (they outlive the tasks that started them)."""
    from fl_tasks.warm import stop_servers  # stdlib-only client; the rehearsal runs from the dev venv

    pids = stop_servers(warm_dir, timeout=20)
    shutil.rmtree(warm_dir, ignore_errors=True)
    return pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- HTTP -------------------------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # see redirects as they are
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def http(method: str, url: str, body: dict | bytes | None = None, token: str | None = None,
         timeout: float = 60, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Accept": "application/json", **(headers or {})}
    data = None
    if isinstance(body, dict):
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    elif body is not None:
        data = body
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - our servers' URLs
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return 0, str(exc).encode(), {}


def get_json(url: str, token: str | None = None) -> dict:
    status, body, _ = http("GET", url, token=token)
    check(status == 200, lambda: f"GET {url}: {status} {body[:500]!r}")
    return json.loads(body)


def wait_for(what: str, ready: Callable[[], bool], services: list[Service], timeout: float,
             interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for service in services:
            check(service.alive(), lambda s=service: f"{s.name} exited (code {s.proc.returncode}) while waiting "
                                                     f"for {what}; last lines of {s.log}:\n{tail(s.log, 40)}")
        check(time.monotonic() < deadline, f"{what} not ready within {timeout:.0f}s")
        time.sleep(interval)


# -- S3 (moto) --------------------------------------------------------------------------------------
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4_headers(method: str, url: str, access_key: str, secret_key: str, region: str = "us-east-1") -> dict:
    """AWS Signature Version 4 headers of a body-less S3 request (what any S3 server, MinIO included, checks)."""
    parts = urllib.parse.urlsplit(url)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical_query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                               for k, v in query)
    headers = {"host": parts.netloc, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, parts.path or "/", canonical_query,
                           "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, EMPTY_SHA256])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date, "Authorization":
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"}


@dataclass
class S3:
    """The S3 server, read with signed plain-HTTP requests (stdlib only)."""

    endpoint: str
    access_key: str
    secret_key: str

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        url = f"{self.endpoint}{path}"
        status, body, _ = http(method, url, b"" if method == "PUT" else None,
                               headers=sigv4_headers(method, url, self.access_key, self.secret_key))
        return status, body

    def create_bucket(self, bucket: str) -> None:
        status, body = self.request("PUT", f"/{bucket}")
        check(status == 200, f"creating bucket {bucket}: {status} {body[:300]!r}")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (ListObjectsV2, page by page)."""
        keys: list[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix} | ({"continuation-token": token} if token else {})
            query_string = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
            status, body = self.request("GET", f"/{bucket}?{query_string}")
            check(status == 200, f"listing s3://{bucket}/{prefix}: {status} {body[:300]!r}")
            root = ET.fromstring(body)
            for element in root.iter():  # drop the S3 XML namespace: plain tag names
                element.tag = element.tag.rpartition("}")[2]
            keys += [c.findtext("Key") for c in root.findall("Contents")]
            token = root.findtext("NextContinuationToken")
            if root.findtext("IsTruncated") != "true" or not token:
                return keys

    def get(self, bucket: str, key: str) -> bytes | None:
        status, body = self.request("GET", f"/{bucket}/{urllib.parse.quote(key)}")
        if status == 404:
            return None
        check(status == 200, f"GET s3://{bucket}/{key}: {status} {body[:300]!r}")
        return body

    def get_json(self, bucket: str, key: str) -> dict | None:
        body = self.get(bucket, key)
        return None if body is None else json.loads(body)


# -- the rehearsal ----------------------------------------------------------------------------------
@dataclass
class Deployment:
    home: Path
    envs: dict[str, Env]
    tools_python: str
    marker: str = field(default_factory=lambda: secrets.token_hex(8))
    s3_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    airflow_port: int = field(default_factory=free_port)
    #: the scheduler's and triggerer's log servers: their defaults (8793/8794) would collide with a second
    #: deployment on the machine (the fault rehearsal beside the plain one in a test run)
    log_server_port: int = field(default_factory=free_port)
    trigger_log_server_port: int = field(default_factory=free_port)
    services: list[Service] = field(default_factory=list)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    #: shared by the API server, the scheduler and the DAG processor (the Helm chart's jwtSecret / apiSecretKey)
    jwt_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    api_secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    token: str | None = None

    def __post_init__(self) -> None:
        self.s3 = S3(f"http://127.0.0.1:{self.s3_port}", "rehearsal", secrets.token_hex(12))
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        self.airflow = f"http://127.0.0.1:{self.airflow_port}"
        self.airflow_home = self.home / "airflow"
        self.dags = self.home / "dags"
        self.logs = self.home / "logs"
        self.store_url = STORE_URL
        # the warm step servers' sockets: a short directory of our own (a long one would fall back to a
        # shared temp directory), so teardown finds and stops every server the steps started
        self.warm_dir = Path(tempfile.mkdtemp(prefix="afw-", dir="/tmp"))

    # environments of the processes, as the deployment's pods would set them
    def s3_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.s3.endpoint, "AWS_ACCESS_KEY_ID": self.s3.access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def tools_env(self) -> dict[str, str]:
        bindir = str(Path(self.tools_python).parent)
        s3_env = self.s3_env()
        env = clean_env(**s3_env, MLFLOW_S3_ENDPOINT_URL=s3_env["AWS_ENDPOINT_URL"], PYTHONUNBUFFERED="1")
        env.update({MARKER_ENV: self.marker, "PATH": os.pathsep.join([bindir, env["PATH"]])})
        return env

    def airflow_env(self) -> dict[str, str]:
        env = clean_env(**self.s3_env())
        env.update({
            MARKER_ENV: self.marker,
            "PATH": os.pathsep.join([str(self.envs["airflow"].bin), env["PATH"]]),
            "PYTHONUNBUFFERED": "1",
            "AIRFED_HOME": str(self.home),
            "AIRFED_STORE_URL": self.store_url,
            "AIRFED_STEP_PYTHON": self.envs["steps"].python,  # the fl-task image's interpreter
            "AIRFED_WARM_DIR": str(self.warm_dir),
            "MLFLOW_TRACKING_URI": self.mlflow,
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.airflow_home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.airflow_home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__API__SECRET_KEY": self.api_secret_key,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.airflow_port),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_server_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.trigger_log_server_port),
            "AIRFLOW__API__BASE_URL": self.airflow,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow}/execution/",
            # task processes start while the API server warms up on a small machine (Airflow's default: 5s)
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        })
        return env

    def stage(self) -> None:
        """The DAGs folder as the Airflow image's ``COPY dags/``; the job's nightly schedule off (REST only)."""
        check(not self.home.exists() or not any(self.home.iterdir()), f"{self.home} is not empty: pass a new --home")
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copytree(REPO / "dags", self.dags, ignore=shutil.ignore_patterns("__pycache__"))
        spec = self.dags / SPEC.name
        text, n = re.subn(r"(?m)^schedule:.*$", "schedule: null             # rehearsal: REST-triggered only",
                          spec.read_text())
        check(n == 1, f"{spec}: no top-level schedule: line to switch off")
        spec.write_text(text)
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        (self.airflow_home / "passwords.json").write_text(json.dumps({"admin": self.password}))

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Service:
        service = Service(name, argv, env, self.logs / f"{name}.log").start(self.home)
        self.services.append(service)
        return service

    def run(self, name: str, argv: list[str], env: dict[str, str], timeout: float = 600) -> str:
        """A one-shot command; its output (also in logs/<name>.log); fails the rehearsal on a non-zero exit."""
        log = self.logs / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**env, MARKER_ENV: self.marker}
        proc = subprocess.run(argv, env=env, cwd=self.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, start_new_session=True)
        log.write_text(proc.stdout)
        check(proc.returncode == 0, lambda: f"{name} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                                            + "\n".join(proc.stdout.splitlines()[-30:]))
        return proc.stdout

    # -- phases
    def smoke(self) -> list[str]:
        """Each environment's entry points: the steps' CLIs; the plugins, the DAG loader and render."""
        steps, airflow = self.envs["steps"], self.envs["airflow"]
        step_env = clean_env(AIRFED_HOME=str(self.home), **{MARKER_ENV: self.marker})
        names = self.run("smoke-steps-list", [steps.python, "-c",
                         "from fl_tasks.contract import ROUND_STEPS; print(' '.join(ROUND_STEPS))"], step_env).split()
        check(names, "fl_tasks.contract.ROUND_STEPS is empty")
        for step in names:
            out = self.run(f"smoke-step-{step}", [steps.python, "-m", "fl_tasks", step, "--help"], step_env)
            check("usage: python -m fl_tasks" in out, f"python -m fl_tasks {step} --help printed no usage:\n{out}")
        airflow_env = self.airflow_env()
        plugins = marked(self.run("smoke-plugins", [airflow.python, "-c", _LOAD_PLUGINS], airflow_env), "PLUGIN")
        check("airfed" in plugins, f"no airfed entry point in group airflow.plugins: {plugins}")
        dag_ids = marked(self.run("smoke-dagbag", [airflow.python, "-c", _DAGBAG, str(self.dags)], airflow_env), "DAGS")
        check(JOB in dag_ids, f"the DAG loader in {self.dags} did not produce {JOB}: {dag_ids}")
        rendered = self.run("smoke-render", [str(airflow.bin / "airfed"), "render", str(self.dags / SPEC.name),
                                             "--runner", "kubernetes"], airflow_env)
        pods = len(re.findall(r"(?m)^kind: Pod$", rendered))
        check(pods >= len(names), f"airfed render produced {pods} pod manifests:\n{rendered[:2000]}")
        done = [f"{len(names)} step CLIs", f"plugins {', '.join(plugins)}", f"DAGs {', '.join(dag_ids)}",
                f"render {pods} pods"]
        say("smoke ok: " + "; ".join(done))
        return done

    def start_s3(self) -> None:
        """moto's S3 server on ``s3_port`` with the store's and MLflow's buckets."""
        self.start("s3", [self.tools_python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
                   self.tools_env())
        wait_for("the S3 server", lambda: http("GET", f"{self.s3.endpoint}/")[0] == 200, self.services, 120)
        self.s3.create_bucket(STORE_BUCKET)
        self.s3.create_bucket(MLFLOW_BUCKET)

    def up(self) -> None:
        self.start_s3()
        self.start("mlflow", [
            self.tools_python, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
            "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
        ], {**self.tools_env(), **MLFLOW_SERVER_ENV})
        # the fl-task image bakes the example's silo data; here the step env creates it under AIRFED_HOME
        self.run("example-data", [sys.executable, install_env.__file__, "example-data", str(self.dags / SPEC.name),
                                  "--python", self.envs["steps"].python],
                 clean_env(AIRFED_HOME=str(self.home)))
        airflow = self.envs["airflow"]
        env = self.airflow_env()
        self.run("airflow-db-migrate", [str(airflow.bin / "airflow"), "db", "migrate"], env)
        for component in ("api-server", "scheduler", "dag-processor"):
            self.start(f"airflow-{component}", [str(airflow.bin / "airflow"), component], env)
        wait_for("the MLflow server", lambda: http("GET", f"{self.mlflow}/health")[0] == 200, self.services,
                 STARTUP_TIMEOUT)
        wait_for("Airflow (API server, scheduler, DAG processor)", self.airflow_healthy, self.services,
                 STARTUP_TIMEOUT)
        status, body, _ = http("POST", f"{self.airflow}/auth/token", {"username": "admin", "password": self.password})
        check(status in (200, 201), f"POST /auth/token: {status} {body[:300]!r}")
        self.token = json.loads(body)["access_token"]

    def airflow_healthy(self) -> bool:
        status, body, _ = http("GET", f"{self.airflow}/api/v2/monitor/health", timeout=5)
        if status != 200:
            return False
        health = json.loads(body)
        return all((health.get(c) or {}).get("status") == "healthy"
                   for c in ("metadatabase", "scheduler", "dag_processor"))

    def api(self, path: str) -> dict:
        return self.airflow_json(f"/api/v2{path}")

    def airflow_json(self, path: str) -> dict:
        """GET an API server path as JSON; on failure, the API server's traceback (e.g. a missing module)."""
        status, body, _ = http("GET", f"{self.airflow}{path}", token=self.token)
        if status != 200:
            server = next(s for s in self.services if s.name == "airflow-api-server")
            raise RehearsalFailed(f"GET {self.airflow}{path}: {status} {body[:500]!r}; last lines of "
                                  f"{server.log}:\n{tail(server.log, 15)}")
        return json.loads(body)

    def trigger(self, rounds: int) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while (status := http("GET", f"{self.airflow}/api/v2/dags/{JOB}", token=self.token)[0]) != 200:
            errors = self.api("/importErrors")["import_errors"]
            if errors:
                raise RehearsalFailed(f"DAG import errors: {errors}")
            check(time.monotonic() < deadline, f"DAG {JOB} never appeared (last status {status})")
            time.sleep(2)
        status, body, _ = http("POST", f"{self.airflow}/api/v2/dags/{JOB}/dagRuns",
                               {"logical_date": None, "conf": {"rounds": rounds}}, self.token)
        check(status == 200, f"POST /api/v2/dags/{JOB}/dagRuns: {status} {body[:500]!r}")
        return json.loads(body)["dag_run_id"]

    def dag_runs(self, dag_id: str = JOB) -> list[dict]:
        return self.api(f"/dags/{dag_id}/dagRuns?limit=100&order_by=start_date")["dag_runs"]

    def head_round(self) -> int:
        head = self.s3.get_json(STORE_BUCKET, f"{STORE_PREFIX}/{JOB}/HEAD.json")
        return int(head["round"]) if head else 0

    def wait_rounds(self, rounds: int) -> list[dict]:
        """Until HEAD reaches ``rounds`` and every DAG run of the job succeeded (one run or chained runs).

        Stops at the first task that failed for good (retries spent): the rehearsal injects no faults, so
        any such task is a defect of the deployed form, reported with its log, without waiting for the
        rest of the run to play out."""
        deadline, last = time.monotonic() + RUN_TIMEOUT, None
        while True:
            for service in self.services:
                check(service.alive(), lambda s=service: f"{s.name} exited during the run; last lines of "
                                                         f"{s.log}:\n{tail(s.log, 40)}")
            runs, head = self.dag_runs(), self.head_round()
            states = [r["state"] for r in runs]
            if (head, states) != last:
                say(f"HEAD round {head}; DAG runs: {', '.join(states) or 'none yet'}")
                last = (head, states)
            if "failed" in states or any(self.failed_tasks(r) for r in runs if r["state"] == "running"):
                raise RehearsalFailed(self.failure_report(runs))
            if head >= rounds and runs and all(s == "success" for s in states):
                return runs
            if time.monotonic() > deadline:
                raise RehearsalFailed(f"HEAD round {head} of {rounds} after {RUN_TIMEOUT}s; DAG runs {states}\n"
                                      + self.failure_report(runs))
            time.sleep(5)

    def task_instances(self, run: dict) -> list[dict]:
        quoted = urllib.parse.quote(run["dag_run_id"], safe="")
        return self.api(f"/dags/{JOB}/dagRuns/{quoted}/taskInstances?limit=1000")["task_instances"]

    def failed_tasks(self, run: dict) -> list[dict]:
        return [ti for ti in self.task_instances(run) if ti["state"] == "failed"]

    def failure_report(self, runs: list[dict]) -> str:
        """The failed task instances of the job's runs, each with the last lines of its log."""
        lines = []
        for run in runs:
            for ti in self.task_instances(run):
                if ti["state"] not in ("failed", "up_for_retry"):
                    continue
                lines.append(f"- {run['dag_run_id']} {ti['task_id']}[{ti['map_index']}]: {ti['state']}")
                lines += ["    " + line for line in self.task_log(run["dag_run_id"], ti)]
        return f"{JOB} failed (DAG runs: {', '.join(r['state'] for r in runs)}); failed tasks:\n" + "\n".join(lines)

    def task_log(self, run_id: str, ti: dict, lines: int = 12) -> list[str]:
        folder = self.airflow_home / "logs" / f"dag_id={JOB}" / f"run_id={run_id}" / f"task_id={ti['task_id']}"
        if ti["map_index"] >= 0:
            folder = folder / f"map_index={ti['map_index']}"
        attempts = sorted(folder.glob("attempt=*.log"))
        if not attempts:
            return [f"(no log under {folder})"]
        events = []
        for raw in attempts[-1].read_text(errors="replace").splitlines():
            try:
                record = json.loads(raw)
                events.append(str(record.get("event", raw)) + (f" {record['error_detail']}"
                                                               if record.get("error_detail") else ""))
            except ValueError:
                events.append(raw)
        return [e[:400] for e in events[-lines:]]

    def verify(self, rounds: int, runs: list[dict]) -> dict:
        """The outcome, checked through the deployment's own interfaces; the summary's figures."""
        summary: dict = {"dag_runs": len(runs), "head_round": self.head_round()}
        check(summary["head_round"] == rounds, f"HEAD is round {summary['head_round']}, {rounds} were asked for")

        # The FL jobs page (Airflow API server + the airfed plugin) reads the store: S3
        plugins = [p["name"] for p in self.api("/plugins")["plugins"]]
        check("airfed" in plugins, f"the API server did not load the airfed plugin: {plugins}")
        data = self.airflow_json("/airfed/api/jobs")
        job = next((j for j in data["jobs"] if j["job"] == JOB), None)
        check(job is not None and job["error"] is None and not data["problems"],
              lambda: f"/airfed/api/jobs: {json.dumps(data)[:2000]}")
        check(data["store_url"].startswith(self.store_url), f"the jobs page reads {data['store_url']}")
        check(job["head_round"] == rounds, f"the jobs page shows HEAD round {job['head_round']}")
        shown = {row["round"]: row for row in job["rounds"]}
        check(set(range(1, rounds + 1)) <= set(shown), f"the jobs page shows rounds {sorted(shown)}")
        check(all(shown[r]["status"] == "registered" for r in range(1, rounds + 1)),
              lambda: f"rounds not registered: {[shown[r] for r in range(1, rounds + 1)]}")
        status, page, _ = http("GET", f"{self.airflow}/airfed/", token=self.token)
        check(status == 200 and JOB.encode() in page and data["store_url"].encode() in page,
              f"GET /airfed/: {status}")
        silos, model = job["silos"], job["registry_model"]

        # The bucket: HEAD, every round's plan/global/updates/result/registry record, the report
        keys = set(self.s3.keys(STORE_BUCKET))
        summary["objects"] = len(keys)
        job_prefix = f"{STORE_PREFIX}/{JOB}"
        expected = {f"{job_prefix}/HEAD.json", f"{job_prefix}/reports/convergence.png"}
        for r in range(1, rounds + 1):
            expected |= {f"{job_prefix}/rounds/{r}/{name}" for name in
                         ("plan.json", "global.safetensors", "result.json", "registry.json")}
            expected |= {f"{job_prefix}/rounds/{r}/updates/{s}.{ext}" for s in silos for ext in ("safetensors", "json")}
        missing = sorted(expected - keys)
        check(not missing, lambda: f"missing from s3://{STORE_BUCKET}: {missing}")
        plot = self.s3.get(STORE_BUCKET, f"{job_prefix}/reports/convergence.png")
        check(plot and plot.startswith(b"\x89PNG"), "reports/convergence.png is not a PNG")

        # The MLflow server: one registry version per round, a champion, the plot; artifacts in S3
        versions = get_json(f"{self.mlflow}/api/2.0/mlflow/model-versions/search?"
                            + urllib.parse.urlencode({"filter": f"name='{model}'"}))["model_versions"]
        summary["registry_versions"] = len(versions)
        check(len(versions) == rounds, f"{len(versions)} registry versions of {model}, expected {rounds}")
        champion = get_json(f"{self.mlflow}/api/2.0/mlflow/registered-models/alias?"
                            + urllib.parse.urlencode({"name": model, "alias": "champion"}))["model_version"]
        summary["champion"] = int(champion["version"])
        record = self.s3.get_json(STORE_BUCKET, f"{job_prefix}/rounds/{rounds}/registry.json")
        status, png, _ = http("GET", f"{self.mlflow}/get-artifact?"
                              + urllib.parse.urlencode({"path": "plots/convergence.png",
                                                        "run_uuid": record["mlflow_run_id"]}))
        check(status == 200 and png.startswith(b"\x89PNG"), f"the convergence plot artifact: {status} {png[:200]!r}")
        artifacts = self.s3.keys(MLFLOW_BUCKET)
        check(any(k.endswith("plots/convergence.png") for k in artifacts),
              f"MLflow's artifacts are not in s3://{MLFLOW_BUCKET}: {artifacts[:20]}")
        summary["mlflow_artifacts"] = len(artifacts)

        # Every extra link of every successful task resolves on the MLflow server
        linked_versions, links = set(), 0
        for run in runs:
            quoted = urllib.parse.quote(run["dag_run_id"], safe="")
            for ti in self.task_instances(run):
                if ti["state"] != "success":
                    continue
                query = f"?map_index={ti['map_index']}" if ti["map_index"] >= 0 else ""
                extra = self.api(f"/dags/{JOB}/dagRuns/{quoted}/taskInstances/{ti['task_id']}/links{query}")
                for name, url in (extra.get("extra_links") or {}).items():
                    if url:
                        links += 1
                        linked_versions |= self.resolve_link(name, url)
        check({(model, str(v["version"])) for v in versions} <= linked_versions,
              f"registry versions without an extra link: {linked_versions}")
        summary["links"] = links

        # The committed history recomputes from S3 (the step environment: numpy, safetensors)
        summary["verify"] = self.verify_in_steps("--all")
        return summary

    def verify_in_steps(self, *options: str) -> str:
        """``airfed verify SPEC <options>`` in the step environment against the deployment's S3 and MLflow
        server (as a one-shot pod would run it); its last line. Fails the rehearsal on a non-zero exit."""
        out = self.run(f"airfed-verify{'-'.join(o.strip('-') for o in ('', *options))}",
                       [str(self.envs["steps"].bin / "airfed"), "verify", str(self.dags / SPEC.name), *options],
                       clean_env(AIRFED_HOME=str(self.home), AIRFED_STORE_URL=self.store_url,
                                 MLFLOW_TRACKING_URI=self.mlflow, **self.s3_env()))
        return out.strip().splitlines()[-1] if out.strip() else ""

    def resolve_link(self, name: str, url: str) -> set[tuple[str, str]]:
        """Check one extra link against its server's REST API; the (model, version) it names.

        Our links open MLflow; ``next_round``'s "Triggered DAG" (the provider's link) opens the
        chained DAG run in Airflow's UI, which must exist."""
        if m := re.fullmatch(re.escape(self.airflow) + r"/dags/([^/]+)/runs/([^/?#]+)", url):
            run_id = urllib.parse.quote(urllib.parse.unquote(m.group(2)), safe="")
            self.api(f"/dags/{m.group(1)}/dagRuns/{run_id}")
            return set()
        check(url.startswith(f"{self.mlflow}/#/"), f"extra link {name!r} points elsewhere: {url}")
        fragment = url.split("#/", 1)[1]
        if m := re.fullmatch(r"experiments/([^/]+)/runs/([0-9a-f]+)", fragment):
            run = get_json(f"{self.mlflow}/api/2.0/mlflow/runs/get?run_id={m.group(2)}")["run"]
            check(run["info"]["experiment_id"] == m.group(1), f"{url}: run is in experiment "
                                                                f"{run['info']['experiment_id']}")
            return set()
        if m := re.fullmatch(r"models/([^/]+)/versions/(\d+)", fragment):
            model = urllib.parse.unquote(m.group(1))
            get_json(f"{self.mlflow}/api/2.0/mlflow/model-versions/get?"
                     + urllib.parse.urlencode({"name": model, "version": m.group(2)}))
            return {(model, m.group(2))}
        if m := re.fullmatch(r"experiments/([^/]+)", fragment):
            get_json(f"{self.mlflow}/api/2.0/mlflow/experiments/get?experiment_id={m.group(1)}")
            return set()
        if m := re.fullmatch(r"models/([^/]+)", fragment):
            get_json(f"{self.mlflow}/api/2.0/mlflow/registered-models/get?"
                     + urllib.parse.urlencode({"name": urllib.parse.unquote(m.group(1))}))
            return set()
        raise RehearsalFailed(f"extra link {name!r}: unrecognised MLflow URL {url}")


def marked(output: str, marker: str) -> list[str]:
    """The words of the lines starting with ``marker`` (the probe's answer amid Airflow's log lines)."""
    return [word for line in output.splitlines() if line.startswith(marker + " ") for word in line.split()[1:]]


_LOAD_PLUGINS = """
from importlib.metadata import entry_points
eps = entry_points(group="airflow.plugins")
for ep in eps:
    plugin = ep.load()
    print("PLUGIN", getattr(plugin, "name", ep.name))
"""

_DAGBAG = """
import sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
if bag.import_errors:
    sys.exit(f"DAG import errors: {bag.import_errors}")
print("DAGS", " ".join(sorted(bag.dag_ids)))
"""


def rehearse(envs: dict[str, Env], home: Path, rounds: int = 2, tools_python: str | None = None,
             smoke: bool = True) -> dict:
    """Smoke-test both environments, deploy, run ``rounds`` rounds through the REST API, check; a summary."""
    started = time.monotonic()
    check_apart(envs)
    deployment = Deployment(home, envs, tools_python or sys.executable)
    deployment.stage()
    summary: dict = {"home": str(home)}
    try:
        summary["smoke"] = deployment.smoke() if smoke else []
        phase = time.monotonic()
        deployment.up()
        summary["startup_seconds"] = round(time.monotonic() - phase)
        say(f"up in {summary['startup_seconds']}s: Airflow {deployment.airflow} (admin / {deployment.password}), "
            f"MLflow {deployment.mlflow}, S3 {deployment.s3.endpoint}, logs {deployment.logs}")
        summary.update(run_and_verify(deployment, rounds))
    finally:
        teardown(deployment)
    summary["seconds"] = round(time.monotonic() - started)
    return summary


def run_and_verify(deployment: Deployment, rounds: int) -> dict:
    """Trigger ``rounds`` rounds of the job through the REST API, wait for them, check the outcome.

    The rehearsal's run, and the fault rehearsal's fault-free first rounds (``--clean-rounds``): the
    suite checks both on one deployment."""
    phase = time.monotonic()
    run_id = deployment.trigger(rounds)
    say(f"triggered {JOB} through the REST API: {run_id} (rounds={rounds})")
    runs = deployment.wait_rounds(rounds)
    return {"run_seconds": round(time.monotonic() - phase), **deployment.verify(rounds, runs)}


def teardown(deployment: Deployment) -> None:
    """Stop everything the deployment started (servers, steps, warm step servers); fail if any is left."""
    killed = stop_all(deployment.services, deployment.marker)
    if killed:
        say(f"killed what did not stop on SIGTERM: {killed}")
    stopped = stop_warm_servers(deployment.warm_dir)
    if stopped:
        say(f"stopped the warm step server(s) of the steps env: {stopped}")
    left = marked_processes(deployment.marker)
    check(not left, f"processes left running: {left}")


def summary_line(summary: dict, envs: dict[str, Env]) -> str:
    built = ", ".join(f"{e.side} env {'reused' if e.cached else 'built'} {e.seconds:.0f}s" for e in envs.values())
    return (f"rehearse: ok | {summary['head_round']} rounds committed (HEAD round {summary['head_round']}, "
            f"{summary['dag_runs']} DAG run(s) succeeded) | {summary['registry_versions']} registry versions, "
            f"champion v{summary['champion']} | {summary['objects']} objects in s3://{STORE_BUCKET}, "
            f"{summary['mlflow_artifacts']} in s3://{MLFLOW_BUCKET} | {summary['links']} extra links resolved | "
            f"{summary['seconds'] + sum(e.seconds for e in envs.values()):.0f} s ({built}; "
            f"startup {summary['startup_seconds']}s, run {summary['run_seconds']}s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rehearse.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds to run through the REST API (default 2)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the environments are kept (.rehearse/)")
    parser.add_argument("--home", type=Path, default=None,
                        help="AIRFED_HOME of the deployment (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the home (logs, DBs) after a successful run")
    ns = parser.parse_args(argv)
    # SIGTERM (a CI timeout, a `kill`) unwinds like Ctrl-C: the finally blocks stop what was started
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    home = ns.home or Path(tempfile.mkdtemp(prefix="airfed-rehearsal-")) / "home"
    try:
        envs = build_envs(ns.cache)
        summary = rehearse(envs, home, ns.rounds)
    except RehearsalFailed as exc:
        print(f"rehearse: FAILED: {exc}\nrehearse: logs under {home}", file=sys.stderr, flush=True)
        return 1
    print(summary_line(summary, envs), flush=True)
    if not ns.keep and ns.home is None:
        shutil.rmtree(home.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
