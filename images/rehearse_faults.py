"""The rehearsal under faults: one deployment, one job, three faults in sequence, then consistency.

``python images/rehearse_faults.py`` deploys as ``make rehearse`` does (``images/rehearse.py``: both
image environments apart, moto's S3, ``mlflow server``, Airflow's api-server, scheduler and
dag-processor with LocalExecutor), triggers the digits job for 2 rounds through the REST API and,
watching task-instance states through ``/api/v2`` and HEAD in the bucket, injects:

1. **scheduler killed** (round 1, once a silo's train task runs): SIGKILL to the scheduler and its
   whole process tree (LocalExecutor workers, task supervisors and task processes; the tree is
   frozen with SIGSTOP first so nothing forks meanwhile), then a new scheduler. It resets the dead
   one's task instances once that one's heartbeat is older than
   ``[scheduler] scheduler_health_check_threshold`` and runs them again.
2. **S3 unreachable for 30 s** (round 2, once a silo's train task runs). The deployment reaches
   moto through a small TCP forwarder (``forward`` below); the forwarder is SIGKILLed (open
   connections reset, new ones refused: what clients see of a stopped MinIO) and restarted on the
   same port 30 s later. moto keeps its objects in memory, so stopping moto itself would lose the
   bucket (it has no persistence), and SIGSTOP would not make it unreachable: the kernel still
   accepts connections and requests hang until minio's 300 s read timeout, a stall, not an outage.
3. **MLflow server killed during register** (the last round, once its register task is under way):
   SIGKILL, kept down until register failed for good, restarted (its SQLite backend and S3
   artifacts keep the data); ``airfed verify --repair`` registers the committed round it missed.

With ``--clean-rounds N`` the job first runs N rounds without faults, checked as ``make rehearse``
checks its run (``rehearse.run_and_verify``), and the faults hit rounds N+1 and N+2 (what the test
suite runs: one deployment for both).

Each fault's outcome (carried by retries / failed and redone / backfilled) is printed as a line;
a round whose run failed is redone by triggering the remaining rounds again. Then, from the bucket
and the MLflow server: HEAD's round equals the number of committed rounds (and the rounds asked
for), every committed round has exactly one registry version whose ``global_sha256`` tag equals
the store's committed global, no other versions, ``champion`` is the version the promotion rule
picks (round by round, only on improvement), and ``airfed verify --all`` passes in the step env.

Settings of this deployment (besides the rehearsal's), so that every fault resolves within minutes:
the staged spec retries a failed step once after 5 s (``execution:``; the example's default is 30 s
with backoff); the scheduler checks for orphaned tasks every 5 s (default 300 s); the steps retry
S3 12 times (``AIRFED_S3_RETRIES``, ≥ 35 s of backoff, so a 30 s outage is ridden out) and the
MLflow client twice (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``; default 7, about 4 minutes).

Stdlib only, like ``rehearse.py`` whose functions it uses, but for the promotion rule itself
(``fl_tasks.lineage.is_better``, from the dev venv that runs the rehearsal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rehearse
from rehearse import JOB, SPEC, STORE_BUCKET, STORE_PREFIX, RehearsalFailed, check, http

ROUNDS = 2
S3_OUTAGE_SECONDS = 30.0
FAULT_TIMEOUT = 900.0
#: the staged spec's retries (see the module docstring)
EXECUTION = "execution: {retries: 1, retry_delay_seconds: 5, retry_exponential_backoff: 0}"
FAULT_SETTINGS = {
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5",
    "AIRFED_S3_RETRIES": "12",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
UNDER_WAY = ("scheduled", "queued", "running")
DONE = ("success", "failed", "skipped", "upstream_failed", "removed")


def say(message: str) -> None:
    print(f"rehearse-faults: {message}", flush=True)


# -- the S3 endpoint that can go away --------------------------------------------------------------
def forward(listen_port: int, target_port: int) -> None:
    """Forward TCP connections from 127.0.0.1:``listen_port`` to 127.0.0.1:``target_port``, forever.

    The S3 endpoint the deployment sees: killing this process is the endpoint going away (open
    connections reset, new ones refused) while the server behind it keeps its data."""
    deadline = time.monotonic() + 60
    while True:  # the port was ours a moment ago; an outgoing connection may hold it briefly
        try:
            server = socket.create_server(("127.0.0.1", listen_port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_relay, args=(client, target_port), daemon=True).start()


def _relay(client: socket.socket, target_port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", target_port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


# -- processes --------------------------------------------------------------------------------------
def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(proc.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def kill_tree(root: int) -> list[int]:
    """SIGKILL ``root`` and every descendant: frozen first (SIGSTOP) until no new one appears, so none
    forks between the scan and the kill; the pids killed."""
    frozen: set[int] = set()
    for _ in range(10):
        new = set(process_tree(root)) - frozen
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= new
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(frozen)


def restart(deployment: FaultDeployment, service: rehearse.Service) -> None:
    """Start a killed service again with the same command line, environment and log."""
    if service.proc is not None:
        service.proc.wait(timeout=60)
    service.start(deployment.home)


# -- the deployment ---------------------------------------------------------------------------------
@dataclass
class FaultDeployment(rehearse.Deployment):
    """The rehearsal's deployment with S3 behind a forwarder on ``s3_port`` (moto on ``moto_port``)."""

    moto_port: int = field(default_factory=rehearse.free_port)
    #: services a fault stopped on purpose (not a failure while they are down)
    stopped: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        super().__post_init__()
        # the deployment's processes use the forwarder; the harness reads moto directly, so its own
        # checks keep working while the endpoint is down
        self.endpoint = self.s3.endpoint
        self.s3 = rehearse.S3(f"http://127.0.0.1:{self.moto_port}", self.s3.access_key, self.s3.secret_key)

    def s3_env(self) -> dict[str, str]:
        return {**super().s3_env(), "AWS_ENDPOINT_URL": self.endpoint}

    def airflow_env(self) -> dict[str, str]:
        return {**super().airflow_env(), **FAULT_SETTINGS}

    def stage(self) -> None:
        super().stage()
        spec = self.dags / SPEC.name
        text = spec.read_text()
        check(not re.search(r"(?m)^execution:", text), f"{spec} has an execution: block; the fault mode sets its own")
        spec.write_text(f"{text.rstrip()}\n{EXECUTION}    # rehearsal faults: retry soon\n")

    def start_s3(self) -> None:
        tools = self.tools_env()
        self.start("moto", [self.tools_python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                   tools)
        rehearse.wait_for("moto", lambda: http("GET", f"{self.s3.endpoint}/")[0] == 200, self.services, 120)
        self.start("s3", [self.tools_python, __file__, "forward", str(self.s3_port), str(self.moto_port)], tools)
        self.wait_s3()
        self.s3.create_bucket(STORE_BUCKET)
        self.s3.create_bucket(rehearse.MLFLOW_BUCKET)

    def wait_s3(self) -> None:
        rehearse.wait_for(f"the S3 endpoint {self.endpoint}", lambda: http("GET", f"{self.endpoint}/")[0] == 200,
                          self.services, 120)

    def service(self, name: str) -> rehearse.Service:
        return next(s for s in self.services if s.name == name)

    def up_services(self) -> list[rehearse.Service]:
        """The services that must be alive (not the one a fault stopped)."""
        return [s for s in self.services if s.name not in self.stopped]

    # -- what the deployment is doing
    def running_run(self) -> dict | None:
        runs = self.api(f"/dags/{JOB}/dagRuns?state=running&limit=10")["dag_runs"]
        return runs[0] if runs else None

    def tasks(self, run: dict, task_id: str) -> list[dict]:
        return [ti for ti in self.task_instances(run) if ti["task_id"] == task_id]

    def run_state(self, run: dict) -> str:
        quoted = urllib.parse.quote(run["dag_run_id"], safe="")
        return self.api(f"/dags/{JOB}/dagRuns/{quoted}")["state"]

    def wait(self, what: str, ready: Callable[[], object], timeout: float = FAULT_TIMEOUT,
             interval: float = 1.0) -> object:
        """Poll ``ready`` until it returns something truthy (that value); the services must stay up."""
        found: list[object] = []

        def probe() -> bool:
            value = ready()
            if value:
                found.append(value)
            return bool(value)

        rehearse.wait_for(what, probe, self.up_services(), timeout, interval)
        return found[0]

    def wait_task(self, task_id: str, states: tuple[str, ...], head_at_least: int,
                  interval: float = 1.0) -> tuple[dict, list[dict]]:
        """The running DAG run (once HEAD is at least ``head_at_least``) with a ``task_id`` instance in
        one of ``states``: (run, those task instances)."""
        def ready() -> tuple[dict, list[dict]] | None:
            run = self.running_run()
            if run is None or self.head_round() < head_at_least:
                return None
            hits = [ti for ti in self.tasks(run, task_id) if ti["state"] in states]
            return (run, hits) if hits else None

        found = self.wait(f"{task_id} {'/'.join(states)} (HEAD >= {head_at_least})", ready, interval=interval)
        return cast(tuple[dict, list[dict]], found)

    def wait_run_done(self, run: dict) -> str:
        return str(self.wait(f"DAG run {run['dag_run_id']} to finish",
                             lambda: (state := self.run_state(run)) in ("success", "failed") and state))

    def retried(self, run: dict, exclude: tuple[str, ...] = ()) -> list[str]:
        """Task instances of ``run`` on a later try than their first (retried or reset and run again)."""
        return [label(ti) for ti in self.task_instances(run) if ti["try_number"] > 1 and ti["task_id"] not in exclude]

    def log_count(self, run: dict, needle: str) -> int:
        """Lines of ``run``'s task logs (every attempt) containing ``needle``."""
        folder = self.airflow_home / "logs" / f"dag_id={JOB}" / f"run_id={run['dag_run_id']}"
        return sum(path.read_text(errors="replace").count(needle) for path in folder.rglob("attempt=*.log"))

    def redo(self, rounds_left: int) -> dict:
        """Trigger the rounds a failed run left undone (the next run); that run."""
        run_id = self.trigger(rounds_left)
        say(f"triggered {JOB} again for the {rounds_left} round(s) left: {run_id}")
        return {"dag_run_id": run_id}


def label(ti: dict) -> str:
    """``train[us]``: a mapped task instance by its silo (the map index template), else its index."""
    if ti["map_index"] < 0:
        return ti["task_id"]
    return f"{ti['task_id']}[{ti.get('rendered_map_index') or ti['map_index']}]"


# -- the faults -------------------------------------------------------------------------------------
def kill_scheduler(d: FaultDeployment, first: int) -> str:
    """Fault 1: SIGKILL the scheduler's process tree while round ``first`` trains; restart; the round goes on."""
    run, hits = d.wait_task("train", ("running",), first - 1, interval=0.3)
    started = time.monotonic()
    scheduler = d.service("airflow-scheduler")
    assert scheduler.proc is not None
    killed = kill_tree(scheduler.proc.pid)
    say(f"fault 1: SIGKILL to the scheduler and {len(killed) - 1} worker/task process(es) while "
        f"{', '.join(map(label, hits))} ran (run {run['dag_run_id']})")
    restart(d, scheduler)
    d.wait("the restarted scheduler to be healthy", d.airflow_healthy, rehearse.STARTUP_TIMEOUT)
    state = d.wait_run_done(run)
    if state != "success":
        raise RehearsalFailed("after the scheduler was killed: " + d.failure_report([run]))
    again = d.retried(run)
    check(again, "the killed task instances were never run again, yet the run succeeded")
    return (f"scheduler SIGKILLed mid-round: carried; the restarted scheduler reset and re-ran {', '.join(again)} "
            f"(round done {time.monotonic() - started:.0f}s after the kill)")


def stop_s3(d: FaultDeployment, first: int, last: int) -> str:
    """Fault 2: the S3 endpoint unreachable for 30 s while round ``first + 1`` trains; a failed run is redone."""
    run, hits = d.wait_task("train", ("running",), first, interval=0.3)
    proxy = d.service("s3")
    d.stopped.add(proxy.name)
    proxy.signal_group(signal.SIGKILL)
    stopped = time.monotonic()
    say(f"fault 2: S3 endpoint {d.endpoint} stopped while {', '.join(map(label, hits))} ran "
        f"(run {run['dag_run_id']})")
    d.wait(f"{S3_OUTAGE_SECONDS:.0f}s of S3 outage", lambda: time.monotonic() - stopped >= S3_OUTAGE_SECONDS)
    restart(d, proxy)
    d.stopped.discard(proxy.name)
    d.wait_s3()
    say(f"fault 2: S3 endpoint back after {time.monotonic() - stopped:.0f}s")
    head_before = d.head_round()
    outcome = d.wait("the round to commit or its run to fail",
                     lambda: "committed" if d.head_round() > head_before else
                     ("failed" if d.run_state(run) == "failed" else None))
    retries = d.log_count(run, "transient error")
    after = f"{time.monotonic() - stopped:.0f}s after the stop"
    if outcome == "failed":
        report = d.failure_report([run])
        d.redo(last - d.head_round())
        return (f"S3 stopped {S3_OUTAGE_SECONDS:.0f}s mid-round: failed clearly ({after}), redone by the next run "
                f"({report[:400]})")
    again = d.retried(run, exclude=("register", "next_round"))
    how = (f"Airflow retried {', '.join(again)}" if again else "no task attempt failed")
    return (f"S3 stopped {S3_OUTAGE_SECONDS:.0f}s mid-round: carried by retries ({retries} S3 request retries "
            f"in the task logs; {how}; round committed {after})")


def stop_mlflow(d: FaultDeployment, last: int) -> str:
    """Fault 3: SIGKILL the MLflow server while the last round (``last``) registers; restart; backfill."""
    run, hits = d.wait_task("register", UNDER_WAY, last, interval=0.3)
    mlflow = d.service("mlflow")
    d.stopped.add(mlflow.name)
    mlflow.signal_group(signal.SIGKILL)
    started = time.monotonic()
    say(f"fault 3: MLflow server killed while register was {hits[0]['state']} (run {run['dag_run_id']})")
    ti = d.wait("register to finish", lambda: next((t for t in d.tasks(run, "register") if t["state"] in DONE), None))
    assert isinstance(ti, dict)
    # a register that succeeded at its first try with the server down finished (its MLflow part) before the kill
    check(not (ti["state"] == "success" and ti["try_number"] == 1),
          "register finished before the MLflow server went down: the fault missed it")
    restart(d, mlflow)
    d.stopped.discard(mlflow.name)
    d.wait("the MLflow server", lambda: http("GET", f"{d.mlflow}/health")[0] == 200, rehearse.STARTUP_TIMEOUT)
    say(f"fault 3: MLflow server restarted; register ended {ti['state']} after {ti['try_number']} tries")
    d.wait_run_done(run)
    if ti["state"] == "success":
        return (f"MLflow killed during register: carried by register's retries (try {ti['try_number']}, "
                f"{time.monotonic() - started:.0f}s)")
    check(ti["state"] == "failed", f"register ended {ti['state']}")
    repaired = d.verify_in_steps("--repair")
    return (f"MLflow killed during register: register failed clearly ({mlflow_errors(d, run)[:160]}); backfilled "
            f"by airfed verify --repair {time.monotonic() - started:.0f}s after the kill ({repaired})")


def mlflow_errors(d: FaultDeployment, run: dict) -> str:
    """The first line of register's logs naming MLflow as unavailable (``LineageUnavailable``), or ''."""
    folder = d.airflow_home / "logs" / f"dag_id={JOB}" / f"run_id={run['dag_run_id']}" / "task_id=register"
    for path in sorted(folder.glob("attempt=*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "LineageUnavailable: " in line:
                with contextlib.suppress(ValueError):
                    line = str(json.loads(line).get("event", line))
                return line.split("LineageUnavailable: ", 1)[1]
    return ""


# -- the checks -------------------------------------------------------------------------------------
def expected_champion(versions: list[dict], direction: str) -> str | None:
    """The version the promotion rule leaves as champion: in round order, a version with a promotion
    value takes the alias when there is none yet or it is better (NaN beats nothing; a real value beats
    a NaN champion), as ``fl_tasks.lineage.is_better``."""
    from fl_tasks.lineage import is_better  # the rule itself (the tools env is the dev venv)

    champion, best = None, math.nan
    for version in sorted(versions, key=lambda v: int(tags_of(v)["round"])):
        raw = tags_of(version).get("promotion_value")
        if raw is None:  # registered late, never evaluated: never champion
            continue
        if champion is None or is_better(float(raw), best, direction):
            champion, best = str(version["version"]), float(raw)
    return champion


def tags_of(version: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in version.get("tags", [])}


def check_consistent(d: FaultDeployment, rounds: int) -> dict:
    """HEAD, the committed results, the registry and champion agree; ``airfed verify --all`` passes."""
    prefix = f"{STORE_PREFIX}/{JOB}"
    head = d.s3.get_json(STORE_BUCKET, f"{prefix}/HEAD.json")
    check(head is not None, "no HEAD.json in the bucket")
    assert head is not None
    results = {}
    for key in d.s3.keys(STORE_BUCKET, f"{prefix}/rounds/"):
        if m := re.fullmatch(re.escape(prefix) + r"/rounds/(\d+)/result\.json", key):
            results[int(m.group(1))] = d.s3.get_json(STORE_BUCKET, key)
    committed = {r: res for r, res in results.items() if res and res.get("committed")}
    check(head["round"] == len(committed) == rounds and set(committed) == set(range(1, rounds + 1)),
          f"HEAD is round {head['round']}; committed rounds {sorted(committed)}; {rounds} were asked for")
    check(head["global_sha256"] == committed[rounds]["new_global"]["sha256"], "HEAD's global is not round "
          f"{rounds}'s committed global")

    plan = d.s3.get_json(STORE_BUCKET, f"{prefix}/rounds/1/plan.json")
    assert plan is not None
    model, direction = plan["registry"]["model_name"], plan["promotion"]["direction"]
    versions = rehearse.get_json(f"{d.mlflow}/api/2.0/mlflow/model-versions/search?"
                                 + urllib.parse.urlencode({"filter": f"name='{model}'"}))["model_versions"]
    by_round: dict[int, list[dict]] = {}
    for version in versions:
        by_round.setdefault(int(tags_of(version).get("round", 0)), []).append(version)
    check(set(by_round) == set(committed) and all(len(v) == 1 for v in by_round.values()),
          lambda: "registry versions by round: " + json.dumps({r: [v["version"] for v in vs]
                                                               for r, vs in sorted(by_round.items())}))
    for r, (version,) in sorted(by_round.items()):
        sha = tags_of(version).get("global_sha256")
        check(sha == committed[r]["new_global"]["sha256"],
              f"v{version['version']} (round {r}) holds global {sha}, the store committed "
              f"{committed[r]['new_global']['sha256']}")
    champion = rehearse.get_json(f"{d.mlflow}/api/2.0/mlflow/registered-models/alias?"
                                 + urllib.parse.urlencode({"name": model, "alias": "champion"}))["model_version"]
    expected = expected_champion(versions, direction)
    check(str(champion["version"]) == expected,
          f"champion is v{champion['version']}, the promotion rule ({direction}) picks v{expected}")
    return {"head_round": head["round"], "committed": len(committed), "registry_versions": len(versions),
            "champion": int(champion["version"]), "verify": d.verify_in_steps("--all")}


def rehearse_faults(envs: dict[str, rehearse.Env], home: Path, rounds: int = ROUNDS,
                    tools_python: str | None = None, clean_rounds: int = 0) -> dict:
    """Deploy, run ``rounds`` rounds under the three faults, check consistency; a summary.

    With ``clean_rounds``, the deployment first runs that many rounds without faults, checked as
    ``make rehearse`` checks its run (``rehearse.run_and_verify``; their figures under ``"clean"``):
    one deployment for both instead of starting every server twice (the test suite's way)."""
    check(rounds >= 2, "the faults need at least 2 rounds (the scheduler in round 1, S3 and MLflow in the last)")
    first, last = clean_rounds + 1, clean_rounds + rounds
    started = time.monotonic()
    d = FaultDeployment(home, envs, tools_python or sys.executable)
    d.stage()
    summary: dict = {"home": str(home), "outcomes": []}
    try:
        d.up()
        say(f"up: Airflow {d.airflow}, MLflow {d.mlflow}, S3 {d.endpoint} (moto {d.s3.endpoint}), logs {d.logs}")
        if clean_rounds:
            summary["clean"] = rehearse.run_and_verify(d, clean_rounds)
            say(f"rounds 1..{clean_rounds} without faults: ok ({summary['clean']['verify']})")
        say(f"triggered {JOB} through the REST API: {d.trigger(rounds)} (rounds={rounds})")
        outcomes = summary["outcomes"]
        outcomes.append(kill_scheduler(d, first))
        say(outcomes[-1])
        outcomes.append(stop_s3(d, first, last))
        say(outcomes[-1])
        outcomes.append(stop_mlflow(d, last))
        say(outcomes[-1])
        summary.update(check_consistent(d, last))
        summary["dag_runs"] = [r["state"] for r in d.dag_runs()]
    finally:
        rehearse.teardown(d)
    summary["seconds"] = round(time.monotonic() - started)
    return summary


def summary_line(summary: dict) -> str:
    return (f"rehearse-faults: ok | {len(summary['outcomes'])} faults | HEAD round {summary['head_round']} = "
            f"{summary['committed']} committed rounds | {summary['registry_versions']} registry versions "
            f"(one per round, global sha256 = the store's), champion v{summary['champion']} | DAG runs "
            f"{', '.join(summary['dag_runs'])} | {summary['verify']} | {summary['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["forward"]:  # the S3 endpoint process this script starts
        forward(int(argv[1]), int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="rehearse_faults.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds under faults (default {ROUNDS})")
    parser.add_argument("--clean-rounds", type=int, default=0,
                        help="rounds to run and check as `make rehearse` does before the faults (default 0)")
    parser.add_argument("--cache", type=Path, default=rehearse.CACHE, help="where the environments are kept")
    parser.add_argument("--home", type=Path, default=None, help="AIRFED_HOME of the deployment (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the home (logs, DBs) after a successful run")
    ns = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    home = ns.home or Path(tempfile.mkdtemp(prefix="airfed-faults-")) / "home"
    try:
        summary = rehearse_faults(rehearse.build_envs(ns.cache), home, ns.rounds, clean_rounds=ns.clean_rounds)
    except RehearsalFailed as exc:
        print(f"rehearse-faults: FAILED: {exc}\nrehearse-faults: logs under {home}", file=sys.stderr, flush=True)
        return 1
    print(summary_line(summary), flush=True)
    if not ns.keep and ns.home is None:
        shutil.rmtree(home.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
