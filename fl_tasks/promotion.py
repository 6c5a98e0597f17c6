"""Moving `champion` under governance: approvals, ``airfed promote`` / ``rollback``, and their records.

One place for every move of the alias that a person asks for (the approval DAG's promote step and
the CLI), and for the history the moves leave:

- on the version that becomes champion, tags ``champion.action`` / ``.by`` / ``.at`` / ``.from``,
  and (unless it is a rollback) ``champion.previous``: the version it replaced. Rollback follows
  ``champion.previous`` of the current champion, so it is defined for any history the alias had.
- on the version that loses the alias, ``champion.replaced_by`` / ``.replaced_at`` / ``.replaced_by_user``.
- a run in the job's MLflow experiment (``airfed.kind = promotion``) naming action, from, to, who, why.
- ``champion.json`` in the store, the mirror the jobs page reads (it has no MLflow).

A version is moved to only if it is a version of this job (its ``job`` tag) and its artifact still
has the sha256 recorded when it was registered (``global_sha256``).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fl_tasks import lineage
from fl_tasks.records import ApprovalRecord, ChampionRecord
from fl_tasks.store import JobKeys, ObjectMissing, PreconditionFailed, Store

TAG_APPROVAL = "approval"  # pending | approved | rejected
TAG_PREVIOUS = "champion.previous"
MODEL_FILE = "global.safetensors"


class PromotionRefused(ValueError):
    """The requested move is not allowed (unknown version, another job's, corrupted artifact...)."""


@dataclass(frozen=True)
class Move:
    """One move of `champion`: from → to, by whom, when, why."""

    action: str
    to_version: int
    from_version: int | None
    by: str
    at: float
    reason: str = ""

    def describe(self, model_name: str) -> str:
        origin = f"v{self.from_version}" if self.from_version is not None else "no champion"
        return f"{model_name}@{lineage.CHAMPION}: {origin} -> v{self.to_version} ({self.action} by {self.by})"


def who() -> str:
    """The person acting from a shell: ``AIRFED_USER``, else the login name."""
    return os.environ.get("AIRFED_USER") or os.environ.get("USER") or "unknown"


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def job_version(c: MlflowClient, job: str, model_name: str, version: int) -> ModelVersion:
    """Version ``version`` of the job's registered model, refused unless it was registered by ``job``."""
    try:
        found = c.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise PromotionRefused(f"{model_name} has no version {version}: {exc.message}") from None
    if found.tags.get("job") != job:
        raise PromotionRefused(
            f"{model_name} v{version} is not a version of job {job!r} (its job tag is {found.tags.get('job')!r})"
        )
    return found


def verify_artifact(version: ModelVersion, tracking_uri: str, scratch: Path) -> str:
    """Download the version's model file and check it against the sha256 recorded at registration."""
    expected = version.tags.get("global_sha256")
    if not expected:
        raise PromotionRefused(f"{version.name} v{version.version} records no global_sha256: cannot verify it")
    try:
        folder = Path(download_artifacts(artifact_uri=version.source, dst_path=str(scratch),
                                         tracking_uri=tracking_uri))
    except (MlflowException, OSError) as exc:
        raise PromotionRefused(f"{version.name} v{version.version}: its artifact {version.source} "
                               f"cannot be read: {exc}") from None
    model_file = folder / MODEL_FILE
    if not model_file.is_file():
        raise PromotionRefused(f"{version.name} v{version.version}: no {MODEL_FILE} in {version.source}")
    digest = hashlib.sha256()
    with open(model_file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise PromotionRefused(
            f"{version.name} v{version.version}: {MODEL_FILE} has sha256 {digest.hexdigest()}, "
            f"but {expected} was registered: the artifact was changed; refusing it"
        )
    return expected


def tag_move(c: MlflowClient, model_name: str, move: Move) -> None:
    """The move's tags on the version that gains the alias and on the one that loses it."""
    to, when = str(move.to_version), iso(move.at)
    tags = {"champion.action": move.action, "champion.by": move.by, "champion.at": when,
            "champion.from": "none" if move.from_version is None else str(move.from_version)}
    if move.reason:
        tags["champion.reason"] = move.reason[:4000]
    if move.action != "rollback" and move.from_version is not None:
        tags[TAG_PREVIOUS] = str(move.from_version)
    for key, value in tags.items():
        c.set_model_version_tag(model_name, to, key, value)
    if move.from_version is not None:
        for key, value in {"champion.replaced_by": to, "champion.replaced_at": when,
                           "champion.replaced_by_user": move.by}.items():
            c.set_model_version_tag(model_name, str(move.from_version), key, value)


def record_move(c: MlflowClient, experiment: str, job: str, model_name: str, move: Move) -> str:
    """A run in the job's experiment for the move (what the MLflow UI lists beside the rounds)."""
    exp_id = lineage.ensure_experiment(c, experiment)
    origin = "none" if move.from_version is None else str(move.from_version)
    run = c.create_run(exp_id, run_name=f"{move.action} v{origin} -> v{move.to_version}", tags={
        lineage.TAG_JOB: job, lineage.TAG_KIND: "promotion", "action": move.action, "model": model_name,
        "from_version": origin, "to_version": str(move.to_version), "by": move.by, "at": iso(move.at),
        **({"reason": move.reason[:4000]} if move.reason else {}),
    })
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def mirror_champion(c: MlflowClient, store: Store, job: str, model_name: str, version: ModelVersion, move: Move,
                    attempts: int = 5) -> bool:
    """``champion.json`` for readers of the store (the jobs page); False if not written.

    The MLflow alias is the truth, and two movers (register's automatic move, a person's promote) can
    race: each writes the mirror only while the alias still names its version, and only
    over the mirror it read (a conditional write, retried), so the mirror ends as the alias ends."""
    round_tag = version.tags.get("round")
    record = ChampionRecord(
        job=job, model_name=model_name, version=move.to_version,
        round=int(round_tag) if round_tag and round_tag.isdigit() else None,
        previous_version=move.from_version, action=move.action, by=move.by, at=move.at, reason=move.reason,
    )
    key = JobKeys(job).champion
    for _ in range(attempts):
        try:
            seen: str | None = store.get_versioned(key)[1]
        except ObjectMissing:
            seen = None
        current = lineage.champion(c, model_name)
        if current is None or int(current.version) != move.to_version:
            return False  # moved on after us: the later mover mirrors its own move
        try:
            if seen is None:
                store.create_record(key, record)
            else:
                store.replace_record_if(key, record, seen)
            return True
        except PreconditionFailed:
            continue  # another mover wrote the mirror meanwhile: look again
    raise RuntimeError(f"{store.describe(key)} kept changing: {attempts} attempts to mirror v{move.to_version}")


def move_champion(c: MlflowClient, store: Store, *, job: str, model_name: str, experiment: str, version: int,
                  action: str, by: str, reason: str = "", scratch: Path) -> Move:
    """Point `champion` at ``version`` of ``job`` after checking it; tag, record and mirror the move."""
    target = job_version(c, job, model_name, version)
    verify_artifact(target, lineage.tracking_uri(), scratch)
    current = lineage.champion(c, model_name)
    from_version = int(current.version) if current is not None else None
    if from_version == version:
        raise PromotionRefused(f"{model_name} v{version} already is {lineage.CHAMPION}")
    move = Move(action, version, from_version, by, time.time(), reason)
    c.set_registered_model_alias(model_name, lineage.CHAMPION, str(version))
    tag_move(c, model_name, move)
    record_move(c, experiment, job, model_name, move)
    mirror_champion(c, store, job, model_name, target, move)
    return move


def event_extra(c: MlflowClient, job: str, model_name: str, move: Move) -> dict:
    """What the job's model Asset event says of a move made by hand: the keys the round DAG's event
    carries (``plugins/airfed/dag/model_event.py``) from the new champion's registration tags, so a
    consumer scores with it as after an approval, plus who moved it, from which version and why."""
    tags = c.get_model_version(model_name, str(move.to_version)).tags
    round_tag, value = tags.get("round", ""), tags.get("promotion_value")
    extra: dict = {
        "job": job, "round": int(round_tag) if round_tag.isdigit() else None, "dag_run_id": tags.get("dag_run_id"),
        "registry_model": model_name, "registry_version": move.to_version, "version": move.to_version,
        "champion_version": move.to_version, "champion_moved": True, "previous_champion": move.from_version,
        "action": move.action, "by": move.by, "reason": move.reason,
        "promotion_metric": tags.get("promotion_metric"), "promotion_value": float(value) if value else None,
    }
    if tags.get("store_key") and tags.get("global_sha256"):
        extra["global"] = {"key": tags["store_key"], "sha256": tags["global_sha256"]}
    return extra


def rollback_target(c: MlflowClient, model_name: str) -> int:
    """The champion before the current one (``champion.previous`` of the current champion)."""
    current = lineage.champion(c, model_name)
    if current is None:
        raise PromotionRefused(f"{model_name} has no {lineage.CHAMPION}: nothing to roll back")
    previous = current.tags.get(TAG_PREVIOUS)
    if not previous:
        raise PromotionRefused(
            f"{model_name} v{current.version} is {lineage.CHAMPION} with no earlier champion recorded "
            f"({TAG_PREVIOUS} tag): nothing to roll back to"
        )
    return int(previous)


def note_improvement(c: MlflowClient, store: Store, job: str, model_name: str, version: ModelVersion,
                     from_version: int | None) -> None:
    """Register moved `champion` on improvement (no approval needed): the same history tags and mirror,
    so a later rollback knows where to go."""
    move = Move("improved", int(version.version), from_version, "register", time.time())
    tag_move(c, model_name, move)
    mirror_champion(c, store, job, model_name, version, move)


# -- approvals -------------------------------------------------------------------------------------
def request_approval(c: MlflowClient, store: Store, record: ApprovalRecord, model_name: str) -> None:
    """A candidate now awaits a person: tagged ``approval=pending`` and recorded for the jobs page."""
    c.set_model_version_tag(model_name, str(record.version), TAG_APPROVAL, "pending")
    store.put_record(JobKeys(record.job).approval(record.round), record)


def answer(c: MlflowClient, store: Store, record: ApprovalRecord, *, approved: bool, by: str, reason: str,
           timed_out: bool, model_name: str, experiment: str, scratch: Path) -> tuple[ApprovalRecord, Move | None]:
    """Apply a person's answer (or the timeout's rejection) to a pending candidate.

    Approve: `champion` moves to the candidate (checked as any move), tagged ``approval=approved``.
    Reject: the candidate is tagged ``approval=rejected`` with the reason; `champion` stays. An
    approval whose move is refused (see :func:`move_champion`) is recorded as such a rejection, then raised.
    """
    if record.state != "pending":
        raise PromotionRefused(f"round {record.round}'s candidate v{record.version} was already {record.state}")
    name, version, at = model_name, str(record.version), time.time()
    move, refused = None, None
    if approved:
        try:
            move = move_champion(c, store, job=record.job, model_name=name, experiment=experiment,
                                 version=record.version, action="approved", by=by, reason=reason, scratch=scratch)
        except PromotionRefused as exc:  # recorded as a rejection saying why, then reported
            approved, refused = False, exc
            reason = f"approved by {by}, but refused: {exc}"
    tags = {TAG_APPROVAL: "approved" if approved else "rejected", "approval.by": by, "approval.at": iso(at)}
    if reason:
        tags["approval.reason"] = reason[:4000]
    if timed_out:
        tags["approval.timed_out"] = "true"
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    done = record.model_copy(update={
        "state": "approved" if approved else "rejected", "by": by, "at": at, "reason": reason, "timed_out": timed_out,
    })
    store.put_record(JobKeys(record.job).approval(record.round), done)
    if refused is not None:
        raise refused
    return done, move
