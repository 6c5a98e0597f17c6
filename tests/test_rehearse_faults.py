"""The deployed form under faults: ``images/rehearse_faults.py`` under pytest.

One deployment of the deployed form (on tests/test_rehearse.py's environments, cached under
``.rehearse/``: built once, airfed reinstalled only when its sources changed) runs the digits job
through the REST API: first 2 rounds without faults, checked as ``make rehearse`` checks its run
(HEAD and every object in the bucket, registry versions and champion, MLflow artifacts in S3, the FL
jobs page, every extra link, ``airfed verify --all``), then 2 more rounds under three faults in
sequence under Airflow's real scheduler: the scheduler's process tree SIGKILLed while round 3
trains, the S3 endpoint gone for 30 s while round 4 trains, the MLflow server killed while round 4
registers. Asserted on outcomes: HEAD's round equals the committed rounds, one registry version per
committed round holding the store's global, the champion the promotion rule picks, ``airfed verify
--all`` passing. (One deployment for both: every server started once, ~30 s of CPU less.)
The small tests check the pieces the faults rely on: the S3 endpoint that can go away keeps
the data behind it, a killed process tree leaves nothing running, the champion rule the check
applies is the register step's.
"""

from __future__ import annotations

import http.server
import itertools
import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "images"))
import rehearse  # noqa: E402
import rehearse_faults  # noqa: E402

#: the environments are test_rehearse.py's: keep both modules on one xdist worker
#: the deployed form: `make test` and `make test-deployed` run it, `make test-quick` leaves it out
pytestmark = pytest.mark.deployed


@pytest.fixture(scope="module")
def envs() -> dict[str, rehearse.Env]:
    return rehearse.build_envs()


#: fault-free rounds before the faults: the deployed form's end-to-end run (``make rehearse``'s checks)
CLEAN_ROUNDS = 2


# First in the file: pytest-xdist (--dist loadfile) hands a worker its next file once two or fewer of
# its tests are pending; with this test last, that worker got a second long file queued behind it.


def test_the_deployed_form_runs_clean_rounds_then_three_faults_leave_store_registry_and_champion_consistent(
        envs, tmp_path):
    summary = rehearse_faults.rehearse_faults(envs, tmp_path / "home", clean_rounds=CLEAN_ROUNDS)
    print(*summary["outcomes"], rehearse_faults.summary_line(summary), sep="\n")
    # the clean rounds, checked as `make rehearse` checks its run (rehearse.run_and_verify)
    clean = summary["clean"]
    assert clean["head_round"] == CLEAN_ROUNDS and clean["registry_versions"] == CLEAN_ROUNDS
    assert clean["dag_runs"] >= 1 and clean["champion"] in range(1, CLEAN_ROUNDS + 1)
    assert clean["links"] >= CLEAN_ROUNDS and clean["mlflow_artifacts"] >= CLEAN_ROUNDS
    assert clean["objects"] >= 1 + CLEAN_ROUNDS * (4 + 2 * 3)  # HEAD, per round plan/global/result/registry + updates
    clean_rounds = ", ".join(map(str, range(1, CLEAN_ROUNDS + 1)))  # airfed verify --all recomputed them from S3
    assert clean["verify"] == f"digits: round(s) {clean_rounds} verified ({rehearse.STORE_URL})", clean["verify"]
    # then the faults, one per fault round
    scheduler, s3, mlflow = summary["outcomes"]
    assert scheduler.startswith("scheduler SIGKILLed mid-round: carried; the restarted scheduler reset and re-ran")
    assert s3.startswith("S3 stopped 30s mid-round: ")
    assert "carried by retries" in s3 or "redone by the next run" in s3
    assert mlflow.startswith("MLflow killed during register: ")
    assert "backfilled by airfed verify --repair" in mlflow or "carried by register's retries" in mlflow
    total = CLEAN_ROUNDS + rehearse_faults.ROUNDS
    assert summary["head_round"] == summary["committed"] == summary["registry_versions"] == total
    assert summary["champion"] in range(1, total + 1)
    rounds = ", ".join(map(str, range(1, total + 1)))
    assert summary["verify"] == f"digits: round(s) {rounds} verified ({rehearse.STORE_URL})"


def wait_until(ready, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.1)


def test_the_s3_endpoint_refuses_connections_while_stopped_and_keeps_the_data_behind_it():
    hits = itertools.count(1)

    class Counter(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"hit": next(hits)}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = rehearse.free_port()
    argv = [sys.executable, rehearse_faults.__file__, "forward", str(port), str(backend.server_port)]
    url = f"http://127.0.0.1:{port}/"
    proxy = subprocess.Popen(argv)
    try:
        wait_until(lambda: rehearse.http("GET", url, timeout=5)[0] == 200)
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(timeout=10)
        status, body, _ = rehearse.http("GET", url, timeout=5)
        assert status == 0 and b"refused" in body.lower(), (status, body)  # stopped: refused, not hanging
        proxy = subprocess.Popen(argv)
        wait_until(lambda: rehearse.http("GET", url, timeout=5)[0] == 200)
        status, body, _ = rehearse.http("GET", url, timeout=5)
        assert status == 200 and json.loads(body)["hit"] > 2  # the server behind kept its state
    finally:
        proxy.kill()
        proxy.wait(timeout=10)
        backend.shutdown()


def test_kill_tree_kills_every_descendant_also_in_other_sessions():
    # a parent whose child starts its own session and a grandchild, like a task runner under a worker
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "\"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(600)']); time.sleep(600)\"], start_new_session=True); time.sleep(600)")
    root = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(lambda: len(rehearse_faults.process_tree(root.pid)) == 3)
        tree = rehearse_faults.process_tree(root.pid)
        killed = rehearse_faults.kill_tree(root.pid)
        assert sorted(tree) == killed
        assert root.wait(timeout=10) == -signal.SIGKILL
        wait_until(lambda: all(not Path(f"/proc/{pid}").exists() or
                               Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                               for pid in killed), timeout=10)
    finally:
        if root.poll() is None:
            root.kill()


def version(number: int, r: int, value: float | None) -> dict:
    tags = {"round": str(r)} | ({"promotion_value": repr(value)} if value is not None else {})
    return {"version": str(number), "tags": [{"key": k, "value": v} for k, v in tags.items()]}


def test_the_champion_check_applies_the_promotion_rule_round_by_round():
    versions = [version(3, 3, 0.8), version(1, 1, 0.7), version(2, 2, 0.9), version(4, 4, None),
                version(5, 5, 0.9)]
    assert rehearse_faults.expected_champion(versions, "maximize") == "2"  # a tie does not move it
    assert rehearse_faults.expected_champion(versions, "minimize") == "1"
    assert rehearse_faults.expected_champion([version(1, 1, math.nan), version(2, 2, 0.1)], "maximize") == "2"
    assert rehearse_faults.expected_champion([version(1, 1, None)], "maximize") is None
