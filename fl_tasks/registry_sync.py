"""The registry converges to the store: every committed round gets exactly one registry version.

The store is the truth (HEAD and the committed ``result.json`` of each round); the MLflow registry
follows it. A round committed while MLflow was unreachable (its register task failed after its
retries) has no version: the next register step, or ``airfed verify --repair``, registers every
such round first, in round order, with the register step's own code (same tags, round run under
the parent run of the DAG run that committed it, champion rule applied round by round).

:func:`check` is the audit ``airfed verify --all`` runs: one version per committed round, its
``global_sha256`` tag equal to the store's committed global, and no version of a round the store
has not committed. Imports MLflow only when called (step side).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fl_tasks.records import Head, Result
from fl_tasks.store import JobKeys, Store

if TYPE_CHECKING:
    from fl_tasks.audit import Report


def committed_rounds(store: Store, keys: JobKeys, upto: int | None = None) -> dict[int, Result]:
    """Committed rounds 1..HEAD (or ``upto``), by their ``result.json``."""
    head = store.get_record_or_none(keys.head, Head)
    last = min(head.round, upto) if head and upto is not None else (head.round if head else 0)
    out = {}
    for r in range(1, last + 1):
        result = store.get_record_or_none(keys.result(r), Result)
        if result is not None and result.committed and result.new_global is not None:
            out[r] = result
    return out


def versions_by_round(model_name: str, job: str) -> dict[int, list]:
    """The registry versions of ``job`` (tags ``job``/``round``) grouped by round."""
    from fl_tasks import lineage

    c = lineage.client()
    out: dict[int, list] = {}
    if not c.search_registered_models(filter_string=f"name = '{model_name}'"):
        return out
    for version in c.search_model_versions(f"name = '{model_name}'"):
        tags = version.tags or {}
        if tags.get("job") == job and str(tags.get("round", "")).isdigit():
            out.setdefault(int(tags["round"]), []).append(version)
    for versions in out.values():
        versions.sort(key=lambda v: int(v.version))
    return out


def model_name_of(store: Store, keys: JobKeys, r: int) -> str:
    from fl_tasks.records import Plan

    return store.get_record(keys.plan(r), Plan).registry.model_name


def missing_rounds(store: Store, keys: JobKeys, upto: int | None = None) -> list[int]:
    """Committed rounds (up to ``upto``) that have no registry version, or whose register was cut short
    after creating it (no ``registry.json``: the champion rule was not applied to it either), in round
    order. Registering them again reuses such a version."""
    committed = committed_rounds(store, keys, upto)
    if not committed:
        return []
    model_name = model_name_of(store, keys, max(committed))
    have = versions_by_round(model_name, keys.job)
    return [r for r in sorted(committed) if r not in have or not store.exists(keys.registry(r))]


def backfill(store: Store, keys: JobKeys, upto: int | None = None,
             log: Callable[[str], None] = print) -> list[int]:
    """Register every committed round up to ``upto`` that has no registry version (or whose register
    was cut short after creating it, see :func:`missing_rounds`); return them."""
    from fl_tasks.records import Plan
    from fl_tasks.steps import register
    from fl_tasks.steps.common import StepArgs, StepEnv

    done = []
    for r in missing_rounds(store, keys, upto):
        plan = store.get_record(keys.plan(r), Plan)
        log(f"round {r}: committed by run {plan.dag_run_id} but its registration is missing or unfinished; "
            "registering it now")
        env = StepEnv(StepArgs("register", keys.job, r, plan.dag_run_id), store=store)
        register.run(env, late=True)
        done.append(r)
    return done


def check(store: Store, keys: JobKeys, model_name: str, report: Report) -> None:
    """One registry version per committed round, with the store's committed global sha256."""
    from fl_tasks import lineage
    from fl_tasks.paths import redact_uri

    where = f"registry {model_name} ({redact_uri(lineage.tracking_uri())})"
    committed = committed_rounds(store, keys)
    try:
        have = versions_by_round(model_name, keys.job)
    except Exception as exc:  # noqa: BLE001 - MLflow unreachable or refusing: one failed check, said plainly
        report.fail(where, f"could not read the registry: {type(exc).__name__}: {exc}")
        return
    for r, result in sorted(committed.items()):
        versions = have.get(r, [])
        if not versions:
            report.fail(where, f"round {r} is committed in the store but has no registry version "
                               "(`airfed verify --repair` registers it)")
            continue
        if len(versions) > 1:
            report.fail(where, f"round {r} has {len(versions)} registry versions "
                               f"({', '.join('v' + v.version for v in versions)}); expected one")
        assert result.new_global is not None  # committed (Result._committed_has_global)
        for v in versions:
            sha = (v.tags or {}).get("global_sha256")
            report.check(sha == result.new_global.sha256, f"{where} v{v.version}",
                         f"round {r}: global_sha256 matches the store's committed global",
                         f"round {r}: global_sha256 {sha} differs from the store's committed global "
                         f"{result.new_global.sha256}")
    for r in sorted(set(have) - set(committed)):
        report.fail(where, f"round {r} has registry version(s) "
                           f"{', '.join('v' + v.version for v in have[r])} but is not committed in the store")
