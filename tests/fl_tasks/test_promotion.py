"""Promotion under governance, in-process against a real MLflow registry (SQLite) and a local store:
register holding improving versions for approval, answers, ``promote`` / ``rollback`` and what they
refuse. (The same through Airflow's REST API and ``dag.test()``: tests/e2e/test_approval.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from registry_job import Job

from fl_tasks import lineage, promotion
from fl_tasks.records import ApprovalRecord, ChampionRecord


def champion(c: MlflowClient, job: Job) -> int | None:
    found = lineage.champion(c, job.model_name)
    return int(found.version) if found else None


def move(c: MlflowClient, job: Job, version: int, action: str, tmp_path: Path, by: str = "ana") -> promotion.Move:
    return promotion.move_champion(c, job.store, job=job.name, model_name=job.model_name,
                                   experiment=f"airfed/{job.name}", version=version, action=action, by=by,
                                   reason="", scratch=tmp_path)


def approval(job: Job, r: int) -> ApprovalRecord | None:
    return job.store.get_record_or_none(job.keys.approval(r), ApprovalRecord)


def answer(c: MlflowClient, job: Job, r: int, approved: bool, tmp_path: Path, **kw):
    return promotion.answer(c, job.store, approval(job, r), approved=approved, by=kw.pop("by", "dr-grey"),
                            reason=kw.pop("reason", ""), timed_out=kw.pop("timed_out", False),
                            model_name=job.model_name, experiment=f"airfed/{job.name}", scratch=tmp_path)


def test_approval_required_holds_every_improving_version_for_a_person(tracking, tmp_path):
    job = Job(tmp_path, "held-job", approval="required")
    first = job.round(0.5)
    assert (first.champion_version, first.promoted, first.awaiting_approval) == (None, False, True)
    assert champion(tracking, job) is None
    pending = approval(job, 1)
    assert (pending.state, pending.version, pending.approval_dag_id) == ("pending", 1, "held-job__approval")
    assert pending.approval_run_id == f"round_1__{job.dag_run_id}"
    assert tracking.get_model_version(job.model_name, "1").tags["approval"] == "pending"
    assert job.register(1).awaiting_approval is True  # a retried register asks once, keeps it pending

    done, moved = answer(tracking, job, 1, True, tmp_path, reason="looks right")
    assert done.state == "approved" and moved.describe(job.model_name).endswith("v1 (approved by dr-grey)")
    assert champion(tracking, job) == 1
    worse = job.round(0.4)  # does not improve on the champion: nothing to approve, nothing moves
    assert (worse.champion_version, worse.promoted, worse.awaiting_approval) == (1, False, False)
    assert approval(job, 2) is None
    better = job.round(0.8)
    assert (better.champion_version, better.awaiting_approval) == (1, True)
    done, moved = answer(tracking, job, 3, False, tmp_path, reason="fails on the eu holdout")
    assert done.state == "rejected" and moved is None and champion(tracking, job) == 1
    tags = tracking.get_model_version(job.model_name, "3").tags
    assert (tags["approval"], tags["approval.by"], tags["approval.reason"]) == (
        "rejected", "dr-grey", "fails on the eu holdout")
    assert job.register(3).awaiting_approval is False  # a re-run keeps the decision taken
    with pytest.raises(promotion.PromotionRefused, match="already rejected"):
        answer(tracking, job, 3, True, tmp_path)


def test_no_answer_in_time_is_a_rejection(tracking, tmp_path):
    job = Job(tmp_path, "timeout-job", approval="required")
    job.round(0.5)
    done, moved = answer(tracking, job, 1, False, tmp_path, by="timeout", timed_out=True,
                         reason="no answer within promotion.approval_timeout")
    assert (done.state, done.timed_out, moved) == ("rejected", True, None)
    assert tracking.get_model_version(job.model_name, "1").tags["approval.timed_out"] == "true"
    assert champion(tracking, job) is None


def test_without_approval_register_still_moves_on_improvement_and_leaves_a_rollback_history(tracking, tmp_path):
    job = Job(tmp_path, "auto-job")
    summaries = [job.round(v) for v in (0.5, 0.7)]
    assert [(s.champion_version, s.promoted, s.awaiting_approval) for s in summaries] == [
        (1, True, False), (2, True, False)]
    assert approval(job, 1) is None and approval(job, 2) is None
    v2 = tracking.get_model_version(job.model_name, "2").tags
    assert (v2["champion.action"], v2["champion.from"], v2[promotion.TAG_PREVIOUS]) == ("improved", "1", "1")
    mirror = job.store.get_record(job.keys.champion, ChampionRecord)
    assert (mirror.version, mirror.previous_version, mirror.action) == (2, 1, "improved")

    assert promotion.rollback_target(tracking, job.model_name) == 1
    back = move(tracking, job, 1, "rollback", tmp_path, by="ops")
    assert (back.from_version, back.to_version) == (2, 1) and champion(tracking, job) == 1
    v1 = tracking.get_model_version(job.model_name, "1").tags
    assert (v1["champion.action"], v1["champion.by"], v1["champion.from"]) == ("rollback", "ops", "2")
    assert job.store.get_record(job.keys.champion, ChampionRecord).action == "rollback"
    with pytest.raises(promotion.PromotionRefused, match="no earlier champion"):  # v1 was the first champion
        promotion.rollback_target(tracking, job.model_name)


def test_moves_refuse_other_jobs_unknown_versions_and_changed_artifacts(tracking, tmp_path):
    job, other = Job(tmp_path / "a", "guarded-job"), Job(tmp_path / "b", "other-job")
    job.round(0.5)
    job.round(0.4)
    other.round(0.9)
    with pytest.raises(promotion.PromotionRefused, match="no version 7"):
        move(tracking, job, 7, "promote", tmp_path)
    with pytest.raises(promotion.PromotionRefused, match="not a version of job 'guarded-job'"):
        promotion.move_champion(tracking, job.store, job=job.name, model_name=other.model_name,
                                experiment="airfed/guarded-job", version=1, action="promote", by="x", scratch=tmp_path)
    with pytest.raises(promotion.PromotionRefused, match="already is champion"):
        move(tracking, job, 1, "promote", tmp_path)
    # the registered artifact of v2 is changed after registration: sha256 no longer matches
    source = tracking.get_model_version(job.model_name, "2").source
    model_file = Path(source.removeprefix("file://")) / promotion.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(promotion.PromotionRefused, match="the artifact was changed"):
        move(tracking, job, 2, "promote", tmp_path)
    assert champion(tracking, job) == 1
    assert "champion.by" not in tracking.get_model_version(job.model_name, "2").tags


def test_an_approval_of_a_changed_artifact_is_recorded_as_refused(tracking, tmp_path):
    job = Job(tmp_path, "tampered-job", approval="required")
    job.round(0.5)
    source = tracking.get_model_version(job.model_name, "1").source
    (Path(source.removeprefix("file://")) / promotion.MODEL_FILE).write_bytes(b"not the registered model")
    with pytest.raises(promotion.PromotionRefused, match="sha256"):
        answer(tracking, job, 1, True, tmp_path)
    record = approval(job, 1)
    assert record.state == "rejected" and record.reason.startswith("approved by dr-grey, but refused:")
    assert champion(tracking, job) is None


def test_the_store_mirror_ends_as_the_alias_ends_when_two_movers_race(tracking, tmp_path, monkeypatch):
    """register's automatic move and a person's promote at once: each writes champion.json only while
    the alias names its version, and only over the mirror it read, so the mirror follows the alias."""
    job = Job(tmp_path, "race-job")
    for value in (0.5, 0.7, 0.9):
        job.round(value)  # v1, v2, v3; register moved the alias to v3 and mirrored it
    mirror = lambda: job.store.get_record(job.keys.champion, ChampionRecord).version  # noqa: E731
    assert champion(tracking, job) == 3 and mirror() == 3
    v1, v2 = (tracking.get_model_version(job.model_name, v) for v in ("1", "2"))

    # a person's move to v1 set the alias, then another move to v2 set it and mirrored before the first
    # mirrored: the first's late mirror must not replace the newer one
    tracking.set_registered_model_alias(job.model_name, lineage.CHAMPION, "2")
    assert promotion.mirror_champion(tracking, job.store, job.name, job.model_name, v2,
                                     promotion.Move("promote", 2, 3, "bo", 2.0))
    assert not promotion.mirror_champion(tracking, job.store, job.name, job.model_name, v1,
                                         promotion.Move("promote", 1, 3, "ana", 1.0))
    assert mirror() == 2

    # the mirror changes between our read and our write: the conditional write loses, the next look
    # finds the alias still ours and writes over the newer mirror
    tracking.set_registered_model_alias(job.model_name, lineage.CHAMPION, "1")
    real, calls = lineage.champion, []

    def champion_while_another_mirrors(c, model_name):
        calls.append(model_name)
        if len(calls) == 1:
            job.store.put_record(job.keys.champion, ChampionRecord(
                job=job.name, model_name=job.model_name, version=2, action="promote", by="bo", at=3.0))
        return real(c, model_name)

    monkeypatch.setattr(lineage, "champion", champion_while_another_mirrors)
    assert promotion.mirror_champion(tracking, job.store, job.name, job.model_name, v1,
                                     promotion.Move("rollback", 1, 2, "ana", 4.0))
    assert len(calls) == 2 and mirror() == 1
