"""The FL jobs page in-process: data from sample round records, HTML from the templates (escaped),
and the app serving only the jobs whose DAG the user may read."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import yaml
from airfed.ui import jobs_page
from airfed.ui.jobs_page import collect_jobs, create_app, readable_jobs, render_html
from helpers import EXAMPLE_SPEC

from fl_tasks.store import JobKeys, open_store

HOSTILE = '<script>alert("x")</script>'


def registry_record(job: str, r: int, accuracy: float, champion: int) -> dict:
    return {
        "job": job, "round": r, "dag_run_id": f"manual__2026-01-0{r}T10:00:00+00:00",
        "accepted": ["asia", "eu", "us"] if r != 2 else ["eu", "us"],
        "rejected": {} if r != 2 else {"asia": f"non-finite values {HOSTILE}"},
        "train_loss": 0.5 / r, "metrics": {"accuracy": accuracy, "loss": 1.0 / r},
        "promotion_metric": "accuracy", "promotion_value": accuracy,
        "registry_model": "digits-mlp", "registry_version": r, "champion_version": champion,
        "promoted": champion == r, "mlflow_experiment_id": "7", "mlflow_run_id": f"run{r}",
        "mlflow_parent_run_id": "parent", "started_at": 1_700_000_000 + 100 * r,
        "finished_at": 1_700_000_030 + 100 * r,
    }


@pytest.fixture
def sample(tmp_path, monkeypatch) -> dict:
    """A DAGs folder (digits, a second job, a broken spec) and a store with 3 rounds of digits + a failed 4th."""
    monkeypatch.setenv("MLFLOW_UI_URL", "http://mlflow.example:5000")
    folder = tmp_path / "dags"
    folder.mkdir()
    digits = yaml.safe_load(EXAMPLE_SPEC.read_text())
    digits["description"] = f"digits {HOSTILE}"
    (folder / "digits.yaml").write_text(yaml.safe_dump(digits))
    (folder / "other.yaml").write_text(yaml.safe_dump({**digits, "job": "other", "registry": {}}))
    (folder / "broken.yaml").write_text("job: broken\nsilos: []\n")
    shutil.copy(EXAMPLE_SPEC.parent / "airfed_dags.py", folder)
    store = open_store(f"file://{tmp_path / 'store'}")
    keys = JobKeys("digits")
    for r, (accuracy, champion) in enumerate([(0.5, 1), (0.7, 2), (0.65, 2)], start=1):
        store.put_json(keys.registry(r), registry_record("digits", r, accuracy, champion))
    store.put_json(keys.head, {"round": 3, "global_key": "k", "global_sha256": "0" * 64})
    store.put_json(keys.result(4), {"round": 4, "committed": False, "reason": "quorum needs 2 accepted updates",
                                    "dag_run_id": "manual__2026-01-04T10:00:00+00:00", "accepted": {},
                                    "rejected": {"eu": "train failed", "us": "train failed"}})
    return {"data": collect_jobs(folder, last=10, store=store), "folder": folder}


def test_collect_jobs_reads_rounds_from_the_store(sample):
    data = sample["data"]
    assert [j["job"] for j in data["jobs"]] == ["digits", "other"]
    assert data["problems"] and all("broken.yaml:" in p for p in data["problems"])
    digits, other = data["jobs"]
    assert digits["head_round"] == 3 and digits["champion_version"] == 2 and digits["latest_version"] == 3
    assert [(r["round"], r["status"]) for r in digits["rounds"]] == [
        (1, "registered"), (2, "registered"), (3, "registered"), (4, "not committed")]
    assert digits["rounds"][0]["links"]["model_version"] == "http://mlflow.example:5000/#/models/digits-mlp/versions/1"
    assert digits["rounds"][0]["links"]["dag_run"] == "/dags/digits/runs/manual__2026-01-01T10%3A00%3A00%2B00%3A00"
    assert digits["links"]["champion"].endswith("/versions/2")
    assert other["head_round"] is None and other["rounds"] == [] and other["error"] is None


def test_html_shows_rounds_and_escapes_every_value(sample):
    page = render_html(sample["data"])
    assert page.startswith("<!doctype html>") and "Federated learning jobs" in page
    assert HOSTILE not in page  # description, rejection reason, all escaped
    assert "digits &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert 'id="job-digits"' in page and 'id="job-other"' in page
    assert "&#9733; champion" in page and "not committed" in page and "quorum needs 2 accepted updates" in page
    assert '<span class="silo bad" title="non-finite values &lt;script&gt;' in page
    assert 'href="http://mlflow.example:5000/#/models/digits-mlp/versions/3"' in page
    assert "0.6500" in page and "<svg class=\"spark\"" in page  # latest metric + sparkline
    assert "manual 2026-01-03 10:00" in page and "30s" in page  # run label, duration
    assert "No rounds yet" in page  # the job without rounds
    assert "Invalid job specs" in page and "broken.yaml" in page


def test_readable_jobs_keeps_only_dags_the_user_may_read(sample):
    data = readable_jobs(sample["data"], lambda dag_id: dag_id == "other")
    assert [j["job"] for j in data["jobs"]] == ["other"]
    assert [j["job"] for j in sample["data"]["jobs"]] == ["digits", "other"]  # not modified in place


class FakeAuth:
    """Users by bearer token; ``alice`` may read every DAG, ``bob`` only ``other``."""

    readable = {"alice": {"digits", "other"}, "bob": {"other"}}

    async def user(self, request):
        from airfed.ui.jobs_page import NotAuthenticated

        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.readable:
            raise NotAuthenticated()
        return token

    def can_read_dag(self, user, dag_id: str) -> bool:
        return dag_id in self.readable[user]

    def login_url(self, next_url: str) -> str:
        return f"/auth/login?next={next_url}"


def test_app_needs_a_login_and_lists_only_readable_dags(sample):
    from starlette.testclient import TestClient

    client = TestClient(create_app(FakeAuth(), collect=lambda _folder, _rounds, **_: sample["data"]))
    assert client.get("/api/jobs").status_code == 401
    login = client.get("/", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/auth/login?next=/airfed/"

    alice = {"authorization": "Bearer alice"}
    bob = {"authorization": "Bearer bob"}
    assert [j["job"] for j in client.get("/api/jobs", headers=alice).json()["jobs"]] == ["digits", "other"]
    assert [j["job"] for j in client.get("/api/jobs", headers=bob).json()["jobs"]] == ["other"]
    assert client.get("/api/jobs/digits", headers=bob).status_code == 404
    assert client.get("/api/jobs/digits", headers=alice).json()["head_round"] == 3
    page = client.get("/", headers=bob)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="job-other"' in page.text and 'id="job-digits"' not in page.text
    assert client.get("/api/jobs?rounds=0", headers=alice).status_code == 422


def test_templates_ship_with_the_package():
    from airfed.ui import jobs_page

    names = {p.name for p in Path(jobs_page.TEMPLATES).iterdir()}
    assert {"jobs.html", "macros.html", "jobs.css"} <= names


class RecordingStore:
    """A local store that records every key read and can hang every read until released."""

    def __init__(self, path: Path, hang: bool = False):
        self.inner = open_store(f"file://{path}")
        self.url = self.inner.url
        self.keys_read: list[str] = []
        self.hang = hang
        self.release = threading.Event()

    def get_json_or_none(self, key: str):
        self.keys_read.append(key)
        if self.hang:
            self.release.wait(60)
        return self.inner.get_json_or_none(key)


def test_the_store_is_read_only_for_jobs_the_user_may_read(sample, tmp_path):
    store = RecordingStore(tmp_path / "store")
    data = collect_jobs(sample["folder"], last=10, store=store, can_read=lambda job: job == "other")
    assert [j["job"] for j in data["jobs"]] == ["other"]
    assert store.keys_read and all(key.startswith("other/") for key in store.keys_read)


def test_a_hanging_store_holds_a_bounded_number_of_threads(sample, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_page, "STORE_TIMEOUT_SECONDS", 0.2)
    store = RecordingStore(tmp_path / "store", hang=True)
    before = threading.active_count()
    try:
        for _ in range(5):  # five page loads of two jobs each against a store that never answers
            data = collect_jobs(sample["folder"], last=10, store=store)
            assert all(job["error"] for job in data["jobs"])
        stuck = threading.active_count() - before
        assert stuck <= jobs_page.STORE_READERS
        assert "earlier reads are still waiting" in data["jobs"][-1]["error"]
    finally:
        store.release.set()
