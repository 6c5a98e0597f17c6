"""Claims and commits: a round number is planned by one run and committed at most once.

Two writers may meet on one job (a manual run beside the schedule, two deployments on one bucket,
a zombie retry). Every step that decides who owns a round does so with a conditional write
(:meth:`Store.create` / :meth:`Store.replace_if`), never by reading first and writing after:

- **claim**: distribute *creates* ``rounds/<r>/plan.json``. A second run finds the round taken
  (:class:`RoundClaimed`, naming the run that holds it) before anything trains. A retry of the same
  run finds its own plan and reuses it. A claim may be taken over, by replacing exactly the plan
  that was read, only when its run gave the round up (an uncommitted ``result.json``) or the claim
  is older than ``AIRFED_CLAIM_LEASE_SECONDS`` (default 6 h; 0 never expires).
- **commit**: aggregate *creates* ``rounds/<r>/result.json`` (the commit point: replacing only an
  uncommitted result, by its version), then moves ``HEAD.json`` from round r-1's version to round
  r (*create* for round 1). A writer that loses changes nothing and raises
  :class:`RoundCommittedElsewhere` naming the run that won.
- **roll forward**: a committed ``result.json`` whose HEAD move was cut short (a crash between the
  two writes) is finished by whoever comes next, so HEAD always catches up with the results.

A run that loses writes ``lost/<dag_run_id>.json`` (:class:`~fl_tasks.records.LostRound`), which
``airfed run`` reads to say which round went to which run. Stdlib, pydantic and the store only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fl_tasks.paths import env_number
from fl_tasks.records import Head, LostRound, Plan, Result
from fl_tasks.store import JobKeys, ObjectMissing, PreconditionFailed, Store

LEASE_ENV = "AIRFED_CLAIM_LEASE_SECONDS"
WAIT_ENV = "AIRFED_CLAIM_WAIT_SECONDS"
DEFAULT_LEASE = 6 * 3600.0
POLL_SECONDS = 2.0


class RoundConflict(RuntimeError):
    """Another run holds or committed this round; this run changed nothing and stops."""

    stage = "conflict"

    def __init__(self, message: str, *, job: str, round: int, dag_run_id: str, winner: str | None):
        super().__init__(message)
        self.job, self.round, self.dag_run_id, self.winner = job, round, dag_run_id, winner


class RoundClaimed(RoundConflict):
    """distribute: the round's plan belongs to another run."""

    stage = "plan"


class RoundCommittedElsewhere(RoundConflict):
    """aggregate: another run committed the round (or moved HEAD past it) first."""

    stage = "commit"


class StaleInput(RoundConflict):
    """aggregate: the round trained from a global that is not HEAD's (HEAD moved meanwhile)."""

    stage = "input"



def claim_wait_seconds() -> float:
    """How long distribute waits for a claimed round to be committed by its owner (default 0: abort)."""
    return env_number(WAIT_ENV, 0.0, float, "a number of seconds")


def claim_lease_seconds() -> float:
    return env_number(LEASE_ENV, DEFAULT_LEASE, float, "a number of seconds")


def _same_claim(a: Plan, b: Plan) -> bool:
    return a.dag_run_id == b.dag_run_id


# -- claim -------------------------------------------------------------------------------------------
def claim_plan(store: Store, keys: JobKeys, plan: Plan, log: Callable[[str], None] = print) -> Plan:
    """Create ``plan.json`` for ``plan.round``; return the plan this run now owns.

    That is ``plan``, or the run's own earlier plan of the round (a retry: reused as it is), or
    ``plan`` replacing an abandoned claim. Raises :class:`RoundClaimed` when another run holds it."""
    key = keys.plan(plan.round)
    while True:
        try:
            store.create_record(key, plan)
            return plan
        except PreconditionFailed:
            pass
        try:
            existing, version, _ = store.get_record_versioned(key, Plan)
        except ObjectMissing:  # removed between the two calls: try to create again
            continue
        if _same_claim(existing, plan):
            return existing
        why = abandoned(store, keys, existing)
        if why is None:
            raise RoundClaimed(
                f"round {plan.round} of job {plan.job} is already claimed by run {existing.dag_run_id} "
                f"(planned {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(existing.created_at))}); "
                f"run {plan.dag_run_id} stops without training",
                job=plan.job, round=plan.round, dag_run_id=plan.dag_run_id, winner=existing.dag_run_id,
            )
        try:
            store.replace_record_if(key, plan, version)
        except PreconditionFailed:
            continue  # someone else took it over first: look again
        log(f"round {plan.round}: took over the claim of run {existing.dag_run_id} ({why})")
        return plan


def abandoned(store: Store, keys: JobKeys, plan: Plan) -> str | None:
    """Why another run's claim on a round may be taken over, or None while it stands."""
    result = store.get_record_or_none(keys.result(plan.round), Result)
    if result is not None:
        if result.committed:
            return None
        if result.dag_run_id == plan.dag_run_id:
            return f"its aggregate gave the round up: {result.reason}"
    lease = claim_lease_seconds()
    age = time.time() - plan.created_at
    if lease and age > lease:
        return f"its claim is {age / 3600:.1f} h old, past {LEASE_ENV}={lease:g}"
    return None


def wait_for_commit(store: Store, keys: JobKeys, conflict: RoundClaimed, seconds: float,
                    log: Callable[[str], None] = print) -> Head:
    """Wait up to ``seconds`` until the claimed round is committed (HEAD reaches it); return HEAD.

    Re-raises ``conflict`` (with what was seen) if it is not committed in time."""
    deadline = time.monotonic() + seconds
    log(f"round {conflict.round} is claimed by run {conflict.winner}; waiting up to {seconds:g}s for it to commit")
    while True:
        roll_forward(store, keys, log)
        head = store.get_record_or_none(keys.head, Head)
        if head is not None and head.round >= conflict.round:
            return head
        if time.monotonic() >= deadline:
            raise RoundClaimed(
                f"{conflict}; run {conflict.winner} did not commit round {conflict.round} within "
                f"{WAIT_ENV}={seconds:g}s",
                job=conflict.job, round=conflict.round, dag_run_id=conflict.dag_run_id, winner=conflict.winner,
            )
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


# -- commit ------------------------------------------------------------------------------------------
def head_versioned(store: Store, keys: JobKeys) -> tuple[Head | None, str | None]:
    """HEAD and its version (for :func:`commit_round`); ``(None, None)`` before round 1 commits."""
    try:
        head, version, _ = store.get_record_versioned(keys.head, Head)
    except ObjectMissing:
        return None, None
    return head, version


def check_input(plan: Plan, head: Head | None, run_id: str) -> None:
    """Refuse to commit a round whose plan is not this run's, or that did not train from HEAD's global."""
    conflict: dict[str, Any] = {"job": plan.job, "round": plan.round, "dag_run_id": run_id}
    if plan.dag_run_id != run_id:
        raise RoundCommittedElsewhere(
            f"round {plan.round} of job {plan.job} is now planned by run {plan.dag_run_id}, not by this run "
            f"({run_id}): its claim was taken over; this run commits nothing",
            **conflict, winner=plan.dag_run_id,
        )
    head_round = head.round if head else 0
    if head_round >= plan.round:
        raise RoundCommittedElsewhere(
            f"round {plan.round} of job {plan.job} was committed by run {head.dag_run_id if head else '?'} "
            f"(HEAD is round {head_round}); run {run_id} commits nothing",
            **conflict, winner=head.dag_run_id if head else None,
        )
    if head_round != plan.round - 1:
        raise StaleInput(
            f"round {plan.round} cannot commit: HEAD is round {head_round} (run "
            f"{head.dag_run_id if head else '-'}), not round {plan.round - 1}",
            **conflict, winner=head.dag_run_id if head else None,
        )
    if head is not None and plan.input_global.sha256 != head.global_sha256:
        raise StaleInput(
            f"round {plan.round} trained from global {plan.input_global.sha256[:12]}, but HEAD (round "
            f"{head.round}, run {head.dag_run_id}) holds {head.global_sha256[:12]}: the round's input is not "
            "the previous round's committed output; refusing to commit",
            **conflict, winner=head.dag_run_id,
        )


def commit_round(store: Store, keys: JobKeys, result: Result, head: Head | None, head_version: str | None,
                 before_head: Callable[[], None] | None = None) -> Head:
    """Create the round's committed ``result.json``, then move HEAD from ``head`` (its version) to it.

    Idempotent for the run that owns the round; :class:`RoundCommittedElsewhere` for any other.
    ``before_head`` runs between the two writes (fault injection in tests)."""
    r = result.round
    assert result.new_global is not None  # a committed Result has one (Result._committed_has_global)
    result_sha = _create_result(store, keys, result)
    if before_head is not None:
        before_head()
    new_head = Head(
        job=result.job, round=r, global_key=result.new_global.key, global_sha256=result.new_global.sha256,
        result_key=keys.result(r), result_sha256=result_sha, server_state=result.server_state,
        dag_run_id=result.dag_run_id,
    )
    _move_head(store, keys, new_head, head, head_version)
    return new_head


def record_uncommitted(store: Store, keys: JobKeys, result: Result) -> None:
    """Write an uncommitted ``result.json`` (why the round did not commit), never over a committed one."""
    _create_result(store, keys, result)


def _create_result(store: Store, keys: JobKeys, result: Result) -> str:
    key = keys.result(result.round)
    while True:
        try:
            return store.create_record(key, result)
        except PreconditionFailed:
            pass
        try:
            existing, version, sha = store.get_record_versioned(key, Result)
        except ObjectMissing:
            continue
        if existing.committed:
            if existing.dag_run_id == result.dag_run_id or not result.committed:
                return sha  # this run's own commit, retried: keep the one that landed
            raise RoundCommittedElsewhere(
                f"round {result.round} of job {result.job} was committed by run {existing.dag_run_id} "
                f"first; run {result.dag_run_id} commits nothing",
                job=result.job, round=result.round, dag_run_id=result.dag_run_id, winner=existing.dag_run_id,
            )
        try:  # an uncommitted attempt (quorum not met) may be replaced, exactly as it was read
            return store.replace_record_if(key, result, version)
        except PreconditionFailed:
            continue


def _move_head(store: Store, keys: JobKeys, new: Head, old: Head | None, old_version: str | None) -> None:
    try:
        if old is None:
            store.create_record(keys.head, new)
        else:
            store.replace_record_if(keys.head, new, old_version or "")
    except PreconditionFailed:
        current = store.get_record_or_none(keys.head, Head)
        if current is not None and current.round == new.round and current.result_sha256 == new.result_sha256:
            return  # moved already (a landed retry, or rolled forward by another writer)
        raise RoundCommittedElsewhere(
            f"HEAD of job {new.job} moved to round {current.round if current else '?'} (run "
            f"{current.dag_run_id if current else '?'}) while run {new.dag_run_id} committed round {new.round}; "
            "HEAD left as it is",
            job=new.job, round=new.round, dag_run_id=new.dag_run_id, winner=current.dag_run_id if current else None,
        ) from None


def roll_forward(store: Store, keys: JobKeys, log: Callable[[str], None] = print) -> Head | None:
    """Finish commits cut short between ``result.json`` and HEAD; return HEAD as it then is."""
    while True:
        head, version = head_versioned(store, keys)
        r = (head.round if head else 0) + 1
        try:
            result, _, sha = store.get_record_versioned(keys.result(r), Result)
        except ObjectMissing:
            return head
        if not result.committed or result.new_global is None:
            return head
        if head is not None and result.input_global.sha256 != head.global_sha256:
            return head  # not built on HEAD: never adopt it
        try:
            _move_head(store, keys, Head(
                job=result.job, round=r, global_key=result.new_global.key,
                global_sha256=result.new_global.sha256, result_key=keys.result(r), result_sha256=sha,
                server_state=result.server_state, dag_run_id=result.dag_run_id,
            ), head, version)
        except RoundCommittedElsewhere:
            continue
        log(f"round {r}: finished the commit of run {result.dag_run_id} (its result was written, HEAD was not)")


# -- the loser's record --------------------------------------------------------------------------------
def record_lost(store: Store, keys: JobKeys, conflict: RoundConflict) -> None:
    """Write ``lost/<dag_run_id>.json`` so ``airfed run`` can report which run took the round."""
    store.put_record(keys.lost(conflict.dag_run_id), LostRound(
        job=conflict.job, round=conflict.round, dag_run_id=conflict.dag_run_id, winner=conflict.winner,
        stage=conflict.stage, reason=str(conflict), at=time.time(),
    ))


def run_rounds(store: Store, keys: JobKeys, dag_run_id: str, first_round: int) -> dict[str, object]:
    """What one DAG run did, from the store: see :func:`chain_outcome`."""
    return chain_outcome(store, keys, [dag_run_id], first_round)


def chain_outcome(store: Store, keys: JobKeys, dag_run_ids: Sequence[str], first_round: int) -> dict[str, Any]:
    """What a chain of DAG runs did, from the store (for ``airfed run``'s summary): the rounds it
    committed, the rounds from ``first_round`` on that other runs committed, and its lost race if any
    (that of its last run, the one that stopped)."""
    head = store.get_record_or_none(keys.head, Head)
    ours = set(dag_run_ids)
    mine, others = [], {}
    for r in range(first_round, (head.round if head else 0) + 1):
        result = store.get_record_or_none(keys.result(r), Result)
        if result is None or not result.committed:
            continue
        if result.dag_run_id in ours:
            mine.append(r)
        else:
            others[r] = result.dag_run_id
    lost = store.get_record_or_none(keys.lost(dag_run_ids[-1]), LostRound) if dag_run_ids else None
    return {
        "committed": mine,
        "committed_by_others": others,
        "lost": lost.model_dump(mode="json", exclude={"schema_version"}) if lost else None,
        "head_round": head.round if head else 0,
    }
