"""A register cut short after it created the round's registry version (MLflow went away before the
champion rule and ``registry.json``) is finished by the next register: the version is reused (no
duplicate), the champion rule is applied to the round, its ``registry.json`` is written. Real
MLflow (SQLite), real steps, local store."""

from __future__ import annotations

import math

import mlflow
import pytest
from round_steps import SILOS, step, train_and_commit

from fl_tasks import lineage, registry_sync
from fl_tasks.records import RegistrySummary
from fl_tasks.store import JobKeys, open_store

MODEL = "digits-mlp"


def one_round(job: str, r: int) -> None:
    step("distribute", job, f"run-{r}")
    train_and_commit(job, f"run-{r}", r)
    for silo in SILOS:
        step("evaluate", job, f"run-{r}", r, silo)


def rule_champion(versions: dict[int, list]) -> str:
    """The champion the promotion rule (maximize accuracy) leaves, round by round."""
    champion, best = None, math.nan
    for r in sorted(versions):
        (version,) = versions[r]
        value = float(version.tags["promotion_value"])
        if champion is None or lineage.is_better(value, best, "maximize"):
            champion, best = version.version, value
    assert champion is not None
    return champion


def test_a_register_cut_short_after_its_version_is_finished_by_the_next(job: str, monkeypatch) -> None:
    store, keys = open_store(), JobKeys(job)
    one_round(job, 1)
    step("register", job, "run-1", 1)
    one_round(job, 2)
    with monkeypatch.context() as m:  # MLflow goes away right after the version was created
        def gone(*_args, **_kwargs):
            raise mlflow.exceptions.MlflowException("connection refused (simulated)")

        m.setattr(mlflow.MlflowClient, "set_registered_model_alias", gone)
        m.setattr(mlflow.MlflowClient, "get_model_version_by_alias", gone)
        with pytest.raises(lineage.LineageUnavailable):
            step("register", job, "run-2", 2)
    assert sorted(registry_sync.versions_by_round(MODEL, job)) == [1, 2]  # round 2's version was created
    assert not store.exists(keys.registry(2))

    one_round(job, 3)
    step("register", job, "run-3", 3)
    versions = registry_sync.versions_by_round(MODEL, job)
    assert {r: len(v) for r, v in versions.items()} == {1: 1, 2: 1, 3: 1}  # round 2's version reused
    assert store.get_record(keys.registry(2), RegistrySummary).registry_version == int(versions[2][0].version)
    assert lineage.champion(lineage.client(), MODEL).version == rule_champion(versions)
