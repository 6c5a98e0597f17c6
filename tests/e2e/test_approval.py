"""End to end: a job with ``promotion.approval: required``, answered through Airflow's REST API.

Two rounds run as two DAG runs (``dag.test()``, real steps, a SQLite MLflow): both versions improve
on "no champion", so each round asks for approval and neither moves `champion`; the rounds do not
wait. Then each candidate's approval DAG runs (``dag.test()`` with the conf the round's trigger
gave its queued approval run) and a person answers through ``PATCH /api/v2/.../hitlDetails``:
round 1 approved (champion → v1), round 2 rejected (champion stays v1, v2 tagged with the reason).
Finally ``airfed promote`` / ``airfed rollback`` by hand: the alias returns to v1 and the tags say
who moved it and from which version; with Airflow's API server named (``AIRFED_AIRFLOW_URL``) each
move by hand is a model Asset event, as an approval's is.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import yaml
from airflow_rest import AirflowRest, answer_when_asked, served_api
from helpers import REPO

APPROVER = "dr-grey"


def gated_spec(folder: Path) -> Path:
    spec = {
        "job": "gated",
        "client_app": "examples.digits.client_app:app",
        "model": {"init": "examples.digits.model:initial_state"},
        "training": {"local-epochs": 1, "lr": 0.05, "batch-size": 32},
        "execution": {"retries": 0},
        # nothing sweeps timeouts under dag.test(): only the last test calls the scheduler's sweep
        "promotion": {"metric": "accuracy", "approval": "required", "approval_timeout": 2},
        "registry": {"model_name": "gated-mlp"},
        "data": {"prepare": "examples.digits.data:prepare", "options": {"partition": "iid", "seed": 3}},
        "silos": [{"name": s, "data": f"${{AIRFED_HOME}}/data/gated/{s}.npz"} for s in ("us", "eu")],
    }
    path = folder / "gated.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory, airflow_db):
    """Two rounds of ``gated`` committed, each candidate awaiting approval."""
    home = tmp_path_factory.mktemp("approval") / "home"
    home.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("AIRFED_HOME", str(home))
    patch.setenv("AIRFED_STORE_URL", f"file://{home / 'store'}")
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    spec_path = gated_spec(home)
    patch.setenv("AIRFED_SPECS", str(spec_path))  # the dags/ loader publishes this spec's DAGs
    from airfed.cli.run import run_rounds
    from airfed.dag.publish import build_all
    from airfed.environment import prepare_silo_data
    from airfed.spec import load_spec

    from fl_tasks.store import open_store

    spec = load_spec(spec_path)
    prepare_silo_data(spec, sys.stdout)
    dags, problems = build_all([spec_path])
    assert not problems
    store = open_store()
    rounds, run_ids, state = run_rounds(dags["gated"], spec, store, 2, None, sys.stdout)
    assert state == "success" and [r["round"] for r in rounds] == [1, 2], (state, rounds)
    yield {"home": home, "spec": spec, "spec_path": spec_path, "dags": dags, "store": store, "rounds": rounds,
           "run_ids": run_ids}
    patch.undo()


def mlflow_client(home: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def champion(home: Path) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(mlflow_client(home).get_model_version_by_alias("gated-mlp", "champion").version)
    except MlflowException:
        return None


def queued_approval_conf(run_id: str) -> dict:
    """The conf the round's request_approval gave its approval run (read over REST)."""
    runs = AirflowRest("observer").get("/dags/gated__approval/dagRuns", limit=100)["dag_runs"]
    (run,) = [r for r in runs if r["dag_run_id"] == run_id]
    assert run["state"] == "queued"
    return run["conf"]


def model_events() -> list[dict]:
    """The gated job's model Asset events, oldest first (over REST)."""
    rest = AirflowRest("observer")
    (asset,) = rest.get("/assets", name_pattern="airfed.gated.model")["assets"]
    return rest.get("/assets/events", asset_id=asset["id"], order_by="timestamp", limit=100)["asset_events"]


def approve_or_reject(job: dict, r: int, option: str, reason: str) -> tuple[object, dict]:
    """Run round ``r``'s approval DAG; a person answers ``option`` over REST while it waits."""
    from airfed.dag.approval import approval_run_id

    conf = queued_approval_conf(approval_run_id(r, job["run_ids"][r - 1]))
    thread, seen = answer_when_asked(APPROVER, "gated__approval", option, {"reason": reason})
    dag_run = job["dags"]["gated__approval"].test(run_conf=conf)
    thread.join(timeout=60)
    assert "error" not in seen, seen
    return dag_run, seen


def test_rounds_do_not_wait_and_champion_does_not_move_without_approval(job):
    home, store = job["home"], job["store"]
    assert champion(home) is None
    assert [r["champion_version"] for r in job["rounds"]] == [None, None]
    versions = {int(v.version): v for v in mlflow_client(home).search_model_versions("name = 'gated-mlp'")}
    assert sorted(versions) == [1, 2] and {v.tags["approval"] for v in versions.values()} == {"pending"}
    for r in (1, 2):  # each round triggered its approval run and finished
        record = store.get_json(f"gated/rounds/{r}/approval.json")
        assert record["state"] == "pending" and record["version"] == r
        conf = queued_approval_conf(record["approval_run_id"])
        assert conf["candidate"]["registry_version"] == r and conf["candidate"]["awaiting_approval"] is True
    # the model Asset event of each round says what happened, for consumers without MLflow
    extras = [e["extra"] for e in model_events()]
    assert [(e["round"], e["version"], e["champion_moved"]) for e in extras[-2:]] == [(1, 1, False), (2, 2, False)]
    assert extras[-1]["metrics"]["accuracy"] == job["rounds"][1]["metrics"]["accuracy"]
    assert extras[-1]["global"] == store.get_json("gated/rounds/2/result.json")["new_global"]


def test_approval_through_rest_moves_the_champion(job):
    home = job["home"]
    dag_run, seen = approve_or_reject(job, 1, "Approve", "validated on the clinic's holdout")
    assert str(dag_run.state) == "success"
    body = seen["request"]["body"]
    assert "gated-mlp v1" in body and "| **accuracy** |" in body and "Per silo" in body and "| us |" in body
    assert seen["response"]["responded_by"]["name"] == APPROVER
    assert champion(home) == 1
    v1 = mlflow_client(home).get_model_version("gated-mlp", "1")
    assert v1.tags["approval"] == "approved" and v1.tags["approval.by"] == APPROVER
    assert v1.tags["champion.by"] == APPROVER and v1.tags["champion.from"] == "none"
    assert v1.tags["champion.action"] == "approved" and v1.tags["approval.at"]
    assert job["store"].get_json("gated/champion.json")["version"] == 1
    tis = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert tis == {"approve": "success", "promote": "success", "model_event": "success"}
    event = model_events()[-1]
    assert event["source_dag_id"] == "gated__approval"
    assert (event["extra"]["round"], event["extra"]["version"], event["extra"]["champion_moved"]) == (1, 1, True)


def test_rejection_through_rest_keeps_the_champion_and_tags_the_version(job):
    home = job["home"]
    dag_run, seen = approve_or_reject(job, 2, "Reject", "drops on the eu silo")
    assert str(dag_run.state) == "success"
    assert "champion v1" in seen["request"]["body"]  # compared with the champion of the time
    assert champion(home) == 1
    v2 = mlflow_client(home).get_model_version("gated-mlp", "2")
    assert v2.tags["approval"] == "rejected" and v2.tags["approval.reason"] == "drops on the eu silo"
    assert v2.tags["approval.by"] == APPROVER and "champion.by" not in v2.tags
    record = job["store"].get_json("gated/rounds/2/approval.json")
    assert record["state"] == "rejected" and record["by"] == APPROVER
    tis = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert tis["promote"] == "success" and tis["model_event"] == "skipped"  # no event: champion did not move


def test_promote_and_rollback_by_hand(job, monkeypatch, capsys):
    from airfed.cli import main

    from fl_tasks.store.base import sha256_bytes

    home, spec_path = job["home"], str(job["spec_path"])
    monkeypatch.setenv("AIRFED_USER", "ops-on-call")
    monkeypatch.delenv("AIRFED_AIRFLOW_URL", raising=False)
    events_before = len(model_events())
    assert main(["promote", spec_path, "--version", "2", "--reason", "override"]) == 0
    assert champion(home) == 2
    # Airflow unreachable: the move stands, the command fails saying the event did not go out
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("AIRFED_AIRFLOW_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AIRFED_AIRFLOW_TOKEN", "unused")
    assert main(["rollback", spec_path]) == 1
    assert champion(home) == 1
    assert main(["promote", spec_path, "--version", "9"]) == 1  # not a version of this job: refused
    captured = capsys.readouterr()
    assert "airfed promote: refused: gated-mlp has no version 9" in captured.err
    assert ("airfed rollback: error: champion moved, but the Asset event for airfed.gated.model failed: "
            f"GET http://127.0.0.1:{closed}/api/v2/assets") in captured.err
    out = captured.out
    assert "gated-mlp@champion: v1 -> v2 (promote by ops-on-call)" in out
    assert "gated-mlp@champion: v2 -> v1 (rollback by ops-on-call)" in out
    assert "note: no Asset event for airfed.gated.model (AIRFED_AIRFLOW_URL is not set)" in out
    assert len(model_events()) == events_before

    # Airflow's API server reachable: each move by hand is a model event, as an approval's is
    with served_api("ops-on-call") as (url, token):
        monkeypatch.setenv("AIRFED_AIRFLOW_URL", url)
        monkeypatch.setenv("AIRFED_AIRFLOW_TOKEN", token)
        assert main(["promote", spec_path, "--version", "2", "--reason", "second look"]) == 0
        assert main(["rollback", spec_path, "--reason", "regression in eu"]) == 0
    assert champion(home) == 1
    assert capsys.readouterr().out.count("asset event: airfed.gated.model #") == 2
    client = mlflow_client(home)
    promoted, rolled_back = (e["extra"] for e in model_events()[-2:])
    for extra, version, previous in ((promoted, 2, 1), (rolled_back, 1, 2)):
        registered = client.get_model_version("gated-mlp", str(version))
        assert (extra["version"], extra["champion_version"], extra["previous_champion"]) == (version, version, previous)
        assert extra["champion_moved"] is True and extra["registry_model"] == "gated-mlp"
        assert extra["by"] == "ops-on-call" and extra["round"] == version and extra["from_rest_api"] is True
        # what a consumer scores with: the version's global model in the store, by its checksum
        assert extra["global"] == {"key": registered.tags["store_key"], "sha256": registered.tags["global_sha256"]}
        assert sha256_bytes(job["store"].get_bytes(extra["global"]["key"])) == extra["global"]["sha256"]
    assert (promoted["action"], rolled_back["action"], rolled_back["reason"]) == ("promote", "rollback",
                                                                                  "regression in eu")

    v1, v2 = client.get_model_version("gated-mlp", "1"), client.get_model_version("gated-mlp", "2")
    assert v1.tags["champion.action"] == "rollback" and v1.tags["champion.by"] == "ops-on-call"
    assert v1.tags["champion.from"] == "2"
    assert v2.tags["champion.replaced_by"] == "1" and v2.tags["champion.replaced_by_user"] == "ops-on-call"
    exp = client.get_experiment_by_name("airfed/gated")
    moves = client.search_runs([exp.experiment_id], "tags.`airfed.kind` = 'promotion'", order_by=["start_time ASC"])
    assert [(r.data.tags["action"], r.data.tags["from_version"], r.data.tags["to_version"], r.data.tags["by"])
            for r in moves] == [("approved", "none", "1", APPROVER)] + [
                ("promote", "1", "2", "ops-on-call"), ("rollback", "2", "1", "ops-on-call")] * 2
    # the jobs page shows the current champion only, the rejected version and no pending candidate
    from airfed.ui.jobs_page import collect_jobs

    (entry,) = collect_jobs(Path(spec_path).parent, store=job["store"])["jobs"]
    assert entry["champion_version"] == 1 and entry["awaiting_approval"] == []
    assert [a["version"] for a in entry["rejected_versions"]] == [2]
    assert REPO.is_dir()


def test_no_answer_in_time_is_a_rejection_by_airflows_timeout_sweep(job):
    """A third round's candidate nobody answers: the scheduler's awaiting_input timeout sweep applies
    the task's default (Reject), and promote tags the version as timed out."""
    import threading
    import time

    from airfed.cli.run import run_rounds
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    home = job["home"]
    rounds, run_ids, state = run_rounds(job["dags"]["gated"], job["spec"], job["store"], 1, None, sys.stdout)
    assert state == "success" and rounds[0]["round"] == 3
    conf = queued_approval_conf(job["store"].get_json("gated/rounds/3/approval.json")["approval_run_id"])
    swept: dict = {}

    def sweep_after_the_deadline() -> None:
        try:
            rest = AirflowRest("observer")
            while not rest.pending_hitl("gated__approval"):
                time.sleep(0.5)
            time.sleep(3)  # past approval_timeout (2 s)
            SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()
            swept["done"] = True
        except BaseException as exc:
            swept["error"] = repr(exc)

    thread = threading.Thread(target=sweep_after_the_deadline, daemon=True)
    thread.start()
    dag_run = job["dags"]["gated__approval"].test(run_conf=conf)
    thread.join(timeout=60)
    assert swept == {"done": True} and str(dag_run.state) == "success"
    assert champion(home) == 1
    v3 = mlflow_client(home).get_model_version("gated-mlp", "3")
    assert (v3.tags["approval"], v3.tags["approval.timed_out"]) == ("rejected", "true")
    assert v3.tags["approval.reason"] == "no answer within promotion.approval_timeout"
    record = job["store"].get_json("gated/rounds/3/approval.json")
    assert record["state"] == "rejected" and record["timed_out"] is True


def test_the_cli_logs_in_to_airflow_with_a_username_and_password(job):
    """Without a token, ``AIRFED_AIRFLOW_USERNAME`` / ``_PASSWORD`` get one from ``POST /auth/token``."""
    from airfed.asset_events import AirflowApi, AirflowApiError
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    with served_api("observer") as (url, _token):
        user, password = next(iter(SimpleAuthManager.get_passwords().items()))
        api = AirflowApi.from_env({"AIRFED_AIRFLOW_URL": url + "/", "AIRFED_AIRFLOW_USERNAME": user,
                                   "AIRFED_AIRFLOW_PASSWORD": password})
        assert api is not None and api.url == url
        assert api.asset_id("airfed.gated.model") == AirflowRest("observer").get(
            "/assets", name_pattern="airfed.gated.model")["assets"][0]["id"]
        with pytest.raises(AirflowApiError, match=r"POST .*/auth/token: HTTP 401"):
            AirflowApi.from_env({"AIRFED_AIRFLOW_URL": url, "AIRFED_AIRFLOW_USERNAME": user,
                                 "AIRFED_AIRFLOW_PASSWORD": password + "-wrong"})
        with pytest.raises(AirflowApiError, match="no Asset named 'airfed.nojob.model'"):
            api.asset_id("airfed.nojob.model")
    assert AirflowApi.from_env({}) is None
    with pytest.raises(AirflowApiError, match="set AIRFED_AIRFLOW_TOKEN, or AIRFED_AIRFLOW_USERNAME"):
        AirflowApi.from_env({"AIRFED_AIRFLOW_URL": url})
    with pytest.raises(AirflowApiError, match="expected the http"):
        AirflowApi.from_env({"AIRFED_AIRFLOW_URL": "file:///etc/passwd", "AIRFED_AIRFLOW_TOKEN": "t"})
