"""The registry converges to the store: rounds committed while MLflow was unreachable get their
version on the next register (or ``verify --repair``), in round order, without duplicates; the audit
checks one version per committed round holding the store's committed global. Real MLflow (SQLite)."""

from __future__ import annotations

import socket

import pytest
from round_steps import step, train_and_commit

from fl_tasks import audit, lineage, registry_sync
from fl_tasks.records import RegistrySummary, Result
from fl_tasks.store import JobKeys, open_store


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def mlflow_down(monkeypatch: pytest.MonkeyPatch):
    """Within the context, MLflow is a tracking server on a closed port of 127.0.0.1 (fails fast)."""
    from contextlib import contextmanager

    @contextmanager
    def down():
        with monkeypatch.context() as m:
            m.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
            m.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            m.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
            yield

    return down


def one_round(job: str, r: int) -> None:
    run_id = f"run-{r}"
    step("distribute", job, run_id)
    train_and_commit(job, run_id, r)
    for silo in ("us", "eu", "asia"):
        step("evaluate", job, run_id, r, silo)


def audit_lines(store, job: str, model: str, repair: bool = False) -> tuple[list[str], int, list[int]]:
    lines: list[str] = []
    report = audit.Report(lines.append)
    repaired = audit.verify_registry(store, job, model, report, repair=repair)
    return lines, report.failures, repaired


def test_round_committed_while_mlflow_was_down_is_registered_later(job: str, mlflow_down) -> None:
    store, keys = open_store(), JobKeys(job)
    model = "digits-mlp"
    one_round(job, 1)
    step("register", job, "run-1", 1)
    one_round(job, 2)
    with mlflow_down(), pytest.raises(lineage.LineageUnavailable, match="MLflow at http://127.0.0.1:"):
        step("register", job, "run-2", 2)
    assert not store.exists(keys.registry(2))
    lines, failures, _ = audit_lines(store, job, model)
    assert failures == 1 and any("round 2 is committed in the store but has no registry version" in ln
                                 for ln in lines), lines

    # the next round's register backfills round 2 first, then registers round 3
    one_round(job, 3)
    step("register", job, "run-3", 3)
    step("register", job, "run-3", 3)  # a retry: nothing duplicated
    versions = registry_sync.versions_by_round(model, job)
    assert {r: len(v) for r, v in versions.items()} == {1: 1, 2: 1, 3: 1}
    for r in (1, 2, 3):
        result = store.get_record(keys.result(r), Result)
        (version,) = versions[r]
        assert version.tags["global_sha256"] == result.new_global.sha256
        assert version.tags["dag_run_id"] == f"run-{r}"
        assert store.get_record(keys.registry(r), RegistrySummary).registry_version == int(version.version)
    assert [int(versions[r][0].version) for r in (1, 2, 3)] == [1, 2, 3]  # registered in round order
    lines, failures, _ = audit_lines(store, job, model)
    assert failures == 0, lines

    # verify --repair: round 4 committed while MLflow was down, repaired without a next round
    one_round(job, 4)
    with mlflow_down(), pytest.raises(lineage.LineageUnavailable):
        step("register", job, "run-4", 4)
    lines, failures, repaired = audit_lines(store, job, model, repair=True)
    assert failures == 0 and repaired == [4], lines
    lines, failures, repaired = audit_lines(store, job, model, repair=True)
    assert failures == 0 and repaired == []
    assert {r: len(v) for r, v in registry_sync.versions_by_round(model, job).items()} == {1: 1, 2: 1, 3: 1, 4: 1}
    c = lineage.client()
    champion = lineage.champion(c, model)
    assert champion is not None and champion.tags["round"] in {"1", "2", "3", "4"}

    # round 5's run stopped right after the commit (no evaluate, no register): registered late, unevaluated
    step("distribute", job, "run-5")
    train_and_commit(job, "run-5", 5)
    lines, failures, repaired = audit_lines(store, job, model, repair=True)
    assert failures == 0 and repaired == [5], lines
    (v5,) = registry_sync.versions_by_round(model, job)[5]
    assert v5.tags["evaluated"] == "false" and "promotion_value" not in v5.tags
    assert lineage.champion(c, model).version == champion.version  # an unevaluated round never becomes champion
    summary5 = store.get_record(keys.registry(5), RegistrySummary)
    assert summary5.promotion_value is None and summary5.champion_version == int(champion.version)
