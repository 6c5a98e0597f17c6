"""Fixtures of the step-side tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from round_steps import REPO

from fl_tasks import commit
from fl_tasks.contract import SPEC_ENV


@pytest.fixture
def job(airfed_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The digits job (one local epoch), its silo data prepared, its spec in AIRFED_SPEC."""
    from airfed.spec import load_spec

    from fl_tasks import prepare_data

    spec = load_spec(REPO / "dags" / "digits.yaml")
    spec = spec.model_copy(update={"training": {**spec.training, "local-epochs": 1}})
    payload = spec.step_payload()
    assert prepare_data.main([payload]) == 0
    monkeypatch.setenv(SPEC_ENV, payload)
    monkeypatch.delenv(commit.WAIT_ENV, raising=False)
    monkeypatch.delenv(commit.LEASE_ENV, raising=False)
    return spec.job


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowClient]:
    """A module's MLflow SQLite store, as the steps find it (created once per module: its migrations
    take seconds); the client to read what they recorded."""
    root = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("AIRFED_MLFLOW_ARTIFACTS", (root / "artifacts").as_uri())
    yield MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    mp.undo()
