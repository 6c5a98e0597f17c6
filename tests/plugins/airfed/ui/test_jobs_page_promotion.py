"""The FL jobs page under ``promotion.approval: required``: the current champion (whoever moved it
last), candidates awaiting approval linked to their approval task, rejected versions."""

from __future__ import annotations

import shutil

import pytest
import yaml
from airfed.ui.jobs_page import collect_jobs, render_html
from helpers import EXAMPLE_SPEC

from fl_tasks.contract import approval_dag_id, approval_run_id
from fl_tasks.store import JobKeys, open_store


def registry_record(r: int, accuracy: float, champion: int | None) -> dict:
    return {
        "job": "digits", "round": r, "dag_run_id": f"manual__2026-01-0{r}T10:00:00+00:00",
        "accepted": ["eu", "us"], "rejected": {}, "train_loss": 0.5, "metrics": {"accuracy": accuracy},
        "promotion_metric": "accuracy", "promotion_value": accuracy, "registry_model": "digits-mlp",
        "registry_version": r, "champion_version": champion, "promoted": champion == r,
        "awaiting_approval": champion != r, "mlflow_experiment_id": "7", "mlflow_run_id": f"run{r}",
        "mlflow_parent_run_id": "parent", "started_at": 1_700_000_000.0, "finished_at": 1_700_000_030.0,
    }


def approval_record(r: int, state: str, **answer) -> dict:
    run = f"manual__2026-01-0{r}T10:00:00+00:00"
    return {"job": "digits", "round": r, "version": r, "dag_run_id": run, "state": state,
            "approval_dag_id": approval_dag_id("digits"), "approval_run_id": approval_run_id(r, run),
            "requested_at": 1_700_000_031.0, **answer}


@pytest.fixture
def data(tmp_path, monkeypatch) -> dict:
    """Round 1 approved then champion; 2 became champion on its own record's time; 3 rejected; 4 pending;
    and afterwards a person rolled `champion` back to v1 (champion.json)."""
    monkeypatch.setenv("MLFLOW_UI_URL", "http://mlflow.example:5000")
    folder = tmp_path / "dags"
    folder.mkdir()
    spec = yaml.safe_load(EXAMPLE_SPEC.read_text())
    spec["promotion"]["approval"] = "required"
    (folder / "digits.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(EXAMPLE_SPEC.parent / "airfed_dags.py", folder)
    store = open_store(f"file://{tmp_path / 'store'}")
    keys = JobKeys("digits")
    for r, accuracy, champ in [(1, 0.5, 1), (2, 0.7, 2), (3, 0.8, 2), (4, 0.9, 2)]:
        store.put_json(keys.registry(r), registry_record(r, accuracy, champ))
    store.put_json(keys.approval(1), approval_record(1, "approved", by="dr-grey", at=1_700_000_100.0))
    store.put_json(keys.approval(3), approval_record(3, "rejected", by="dr-grey", reason="drops on <eu>"))
    store.put_json(keys.approval(4), approval_record(4, "pending"))
    store.put_json(keys.head, {"round": 4})
    store.put_json(keys.champion, {"job": "digits", "model_name": "digits-mlp", "version": 1, "round": 1,
                                   "previous_version": 2, "action": "rollback", "by": "ops", "at": 1.0})
    return collect_jobs(folder, last=10, store=store)


def test_the_current_champion_candidates_and_rejections(data):
    (job,) = data["jobs"]
    assert job["promotion"]["approval"] == "required"
    assert job["champion_version"] == 1  # rolled back after round 4 registered with champion v2
    assert job["links"]["champion"] == "http://mlflow.example:5000/#/models/digits-mlp/versions/1"
    (pending,) = job["awaiting_approval"]
    assert pending["version"] == 4
    assert pending["link"] == ("/dags/digits__approval/runs/round_4__manual__2026-01-04T10%3A00%3A00%2B00%3A00"
                               "/tasks/approve/required_actions")
    assert [(a["version"], a["reason"]) for a in job["rejected_versions"]] == [(3, "drops on <eu>")]


def test_only_the_current_champion_carries_the_badge(data):
    page = render_html(data)
    assert page.count("&#9733; champion") == 1
    row_v1 = page[page.rindex("/versions/1\""):]  # rows newest first: v1's is the last
    assert "&#9733; champion" in row_v1[:row_v1.index("</tr>")]
    assert 'class="badge warn" href="/dags/digits__approval/runs/round_4__' in page and "awaiting approval" in page
    assert 'title="dr-grey: drops on &lt;eu&gt;">rejected</span>' in page
    assert "approved by dr-grey" in page
