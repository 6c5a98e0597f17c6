"""Champion logic: ``lineage.is_better`` and the alias rules of the register step, on a real MLflow store.

The promotion decision is made inline in :func:`fl_tasks.steps.register.run`, so the alias rules are
tested by running that step in-process over committed rounds written to a local store in
``tmp_path`` (records through :mod:`fl_tasks.records`), against an MLflow SQLite tracking store.
"""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient
from registry_job import Job

from fl_tasks import lineage
from fl_tasks.records import (
    Plan,
    RegistrySummary,
    Result,
)
from fl_tasks.spec import Promotion
from fl_tasks.steps import register

NAN = float("nan")
INF = float("inf")

# --- is_better ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "than", "direction", "expected"),
    [
        (0.8, 0.7, "maximize", True),
        (0.7, 0.7, "maximize", False),  # a tie is not an improvement
        (0.6, 0.7, "maximize", False),
        (0.6, 0.7, "minimize", True),
        (0.7, 0.7, "minimize", False),
        (0.8, 0.7, "minimize", False),
        (0.0, None, "maximize", True),  # no champion yet
        (9.9, None, "minimize", True),
        (INF, 1e308, "maximize", True),
        (1.0, INF, "minimize", True),
        (-INF, 0.0, "maximize", False),
    ],
)
def test_is_better(value, than, direction, expected):
    assert lineage.is_better(value, than, direction) is expected


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("than", [0.0, 0.5, -1.0, INF, -INF])
def test_a_nan_value_never_beats_a_champion(direction, than):
    assert lineage.is_better(NAN, than, direction) is False


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_any_real_value_beats_a_nan_champion(direction):
    assert lineage.is_better(0.5, NAN, direction) is True


# --- the register step over a real MLflow store -------------------------------------------------------------------


def _champion(c: MlflowClient, job: Job) -> int:
    return int(c.get_model_version_by_alias(job.model_name, lineage.CHAMPION).version)


def _walk(c: MlflowClient, job: Job, values: list[float]) -> list[tuple[int, int, bool]]:
    """(registered version, champion version, promoted) after each round; checks MLflow agrees."""
    out = []
    for value in values:
        summary = job.round(value)
        assert _champion(c, job) == summary.champion_version
        out.append((summary.registry_version, summary.champion_version, summary.promoted))
    return out


def test_champion_moves_only_when_the_metric_improves_maximize(tracking, tmp_path):
    job = Job(tmp_path, "max-job")
    assert _walk(tracking, job, [0.5, 0.7, 0.6, 0.7, 0.9]) == [
        (1, 1, True), (2, 2, True), (3, 2, False), (4, 2, False), (5, 5, True),
    ]
    versions = tracking.search_model_versions(f"name = '{job.model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4, 5]
    tags = {int(v.version): v.tags for v in versions}
    assert [tags[v]["promotion_value"] for v in range(1, 6)] == ["0.5", "0.7", "0.6", "0.7", "0.9"]
    assert all(tags[v]["round"] == str(v) and tags[v]["promotion_metric"] == "accuracy" for v in tags)
    # lineage of the last round: the version and its round run name the store objects and checksums
    summary = job.store.get_record(job.keys.registry(5), RegistrySummary)
    head = job.head
    assert tags[5]["global_sha256"] == head.global_sha256 and tags[5]["store_key"] == head.global_key
    assert tags[5]["update_sha256.us"] == "a" * 64 and tags[5]["dag_run_id"] == job.dag_run_id
    run = tracking.get_run(summary.mlflow_run_id)
    assert run.data.params["new_global_sha256"] == head.global_sha256
    assert run.data.metrics["accuracy"] == pytest.approx(0.9) and run.data.metrics["accepted"] == 1
    assert run.data.tags["mlflow.parentRunId"] == summary.mlflow_parent_run_id
    assert math.isclose(summary.promotion_value, 0.9)


def test_champion_moves_only_when_the_metric_improves_minimize(tracking, tmp_path):
    job = Job(tmp_path, "min-job", metric="loss", direction="minimize")
    assert _walk(tracking, job, [1.0, 1.2, 1.0, 0.3]) == [(1, 1, True), (2, 1, False), (3, 1, False), (4, 4, True)]


def test_re_registering_keeps_versions_and_champion_and_a_manual_move_is_respected(tracking, tmp_path):
    job = Job(tmp_path, "rerun-job")
    _walk(tracking, job, [0.5, 0.9, 0.6])
    again = job.register(3)  # a retried register step of a round that did not improve
    assert (again.registry_version, again.champion_version, again.promoted) == (3, 2, False)
    again = job.register(2)  # the champion's own round, re-run: still champion, not "promoted" again
    assert (again.registry_version, again.champion_version, again.promoted) == (2, 2, False)
    assert _champion(tracking, job) == 2
    assert len(tracking.search_model_versions(f"name = '{job.model_name}'")) == 3

    tracking.set_registered_model_alias(job.model_name, lineage.CHAMPION, "1")  # a rollback by hand
    summary = job.round(0.7)  # better than the champion v1 (0.5), worse than the best ever (0.9)
    assert (summary.registry_version, summary.champion_version, summary.promoted) == (4, 4, True)
    assert _champion(tracking, job) == 4


def test_two_registers_racing_on_a_round_leave_one_version(tracking, tmp_path, monkeypatch):
    """Both looked before either created (tests/e2e/test_concurrent_runs.py met this: the winner's
    register and the loser's, finishing the winner's round): the later creation yields to the earlier."""
    job = Job(tmp_path, "race-job")
    first = job.round(0.5)
    monkeypatch.setattr(lineage, "find_version", lambda *args, **kwargs: None)  # saw nothing, like the racer
    late = job.register(1)
    versions = tracking.search_model_versions(f"name = '{job.model_name}'")
    assert [int(v.version) for v in versions] == [1]  # its own v2 deleted
    assert (late.registry_version, late.champion_version) == (first.registry_version, 1) == (1, 1)

    # the earlier creator, checking after a later one was created, keeps its own and leaves the other be
    (v1,) = versions
    run_id = tracking.get_model_version(job.model_name, "1").run_id
    v2 = tracking.create_model_version(job.model_name, source=v1.source, run_id=run_id, tags=v1.tags)
    kept = lineage.first_version(tracking, job.model_name, job.name, 1, v1.tags["dag_run_id"],
                                 v1.tags["global_sha256"], v1)
    assert kept.version == v1.version
    both = tracking.search_model_versions(f"name = '{job.model_name}'")
    assert sorted(int(v.version) for v in both) == [1, int(v2.version)]
    assert lineage.first_version(tracking, job.model_name, job.name, 1, "another-run", v1.tags["global_sha256"],
                                 v2).version == v1.version  # v2's creator yields
    assert [int(v.version) for v in tracking.search_model_versions(f"name = '{job.model_name}'")] == [1]


def test_a_nan_round_does_not_replace_a_champion(tracking, tmp_path):
    job = Job(tmp_path, "nan-later-job")
    assert _walk(tracking, job, [0.5, NAN]) == [(1, 1, True), (2, 1, False)]


def test_a_nan_champion_is_replaced_by_the_first_real_value(tracking, tmp_path):
    job = Job(tmp_path, "nan-first-job")
    job.round(NAN)
    summary = job.round(0.9)
    assert (summary.champion_version, summary.promoted) == (2, True)


def test_an_uncommitted_round_registers_nothing(tracking, tmp_path):
    job = Job(tmp_path, "uncommitted-job")
    job.round(0.5)
    r = 2
    plan = job.store.get_record(job.keys.plan(1), Plan).model_copy(update={"round": r})
    job.store.put_record(job.keys.plan(r), plan)
    job.store.put_record(job.keys.result(r), Result(
        job=job.name, round=r, dag_run_id=job.dag_run_id, committed=False, reason="quorum needs 2",
        input_global=job.head.global_ref, rejected={"us": "non-finite"},
    ))
    with pytest.raises(register.RoundNotCommitted, match="quorum needs 2"):
        job.register(r)
    assert len(tracking.search_model_versions(f"name = '{job.model_name}'")) == 1
    assert _champion(tracking, job) == 1


def test_a_promotion_metric_the_app_does_not_report_is_a_clear_error(tracking, tmp_path):
    job = Job(tmp_path, "metric-job")
    r = job.commit(0.5)
    plan = job.store.get_record(job.keys.plan(r), Plan)
    job.store.put_record(job.keys.plan(r), plan.model_copy(update={"promotion": Promotion(metric="f1")}))
    with pytest.raises(RuntimeError, match="promotion metric 'f1' is not among .*'accuracy'"):
        job.register(r)
