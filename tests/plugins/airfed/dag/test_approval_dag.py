"""The approval pieces of the Airflow side, in-process: the body a person reads, the model event's
extra, and the spec fields."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml
from airfed.dag.approval import approval_body
from airfed.dag.model_event import event_extra
from airfed.spec import SpecError, parse_spec_text
from helpers import EXAMPLE_SPEC


def candidate(**extra) -> dict:
    return {
        "job": "digits", "round": 4, "dag_run_id": "manual__x", "registry_model": "digits-mlp", "registry_version": 4,
        "promotion_metric": "accuracy", "metrics": {"accuracy": 0.91, "loss": 0.3},
        "silo_metrics": {"us": {"accuracy": 0.95}, "eu": {"accuracy": 0.88}},
        "accepted": ["eu", "us"], "rejected": {"asia": "update norm 310.2 exceeds max_update_norm 100"},
        "mlflow_experiment_id": "3", "mlflow_run_id": "r4", "promoted": False, "awaiting_approval": True,
        "champion_version": 2, "global": {"key": "digits/rounds/5/global.safetensors", "sha256": "a" * 64},
        **extra,
    }


def test_the_body_compares_the_candidate_with_the_champion(monkeypatch):
    monkeypatch.setenv("MLFLOW_UI_URL", "http://mlflow.example")
    champion = {"version": 2, "round": 2, "metrics": {"accuracy": 0.89, "loss": 0.35},
                "silo_metrics": {"us": {"accuracy": 0.9}, "eu": {"accuracy": 0.9}},
                "mlflow_experiment_id": "3", "mlflow_run_id": "r2"}
    body = approval_body(candidate(champion=champion), "maximize", timedelta(days=1))
    assert "### digits-mlp v4: promote to `champion`?" in body
    assert "| metric | candidate v4 (round 4) | champion v2 (round 2) |" in body
    assert "| **accuracy** | 0.9100 | 0.8900 |" in body and "| loss | 0.3000 | 0.3500 |" in body
    assert "| eu | 0.8800 | 0.9000 |" in body and "| us | 0.9500 | 0.9000 |" in body
    assert "Rejected: asia (update norm 310.2 exceeds max_update_norm 100)." in body
    assert "[candidate's round run](http://mlflow.example/#/experiments/3/runs/r4)" in body
    assert "[champion's round run](http://mlflow.example/#/experiments/3/runs/r2)" in body
    assert "No answer within 1 day, 0:00:00 counts as Reject." in body
    first = approval_body(candidate(champion=None), "maximize", timedelta(hours=2))
    assert "Current champion: none." in first and "| **accuracy** | 0.9100 | – |" in first


def test_event_extra_from_register_and_from_promote():
    extra = event_extra(candidate(champion={"version": 2}))
    facts = (extra["round"], extra["version"], extra["champion_moved"], extra["awaiting_approval"])
    assert facts == (4, 4, False, True)
    assert extra["metrics"] == {"accuracy": 0.91, "loss": 0.3} and extra["global"]["sha256"] == "a" * 64
    assert "champion" not in extra and "silo_metrics" not in extra  # the event stays small
    promoted = event_extra({"job": "digits", "round": 4, "registry_version": 4, "champion_moved": True,
                            "champion_version": 4, "global": {"key": "k", "sha256": "b" * 64}})
    assert (promoted["version"], promoted["champion_moved"], promoted["champion_version"]) == (4, True, 4)


def test_promotion_fields_are_checked_with_their_line():
    data = yaml.safe_load(EXAMPLE_SPEC.read_text())
    assert parse_spec_text(yaml.safe_dump(data), "digits.yaml").promotion.approval == "none"  # the default
    data["promotion"] = {"metric": "accuracy", "approval": "maybe", "approval_timeout": 0}
    with pytest.raises(SpecError) as info:
        parse_spec_text(yaml.safe_dump(data, sort_keys=False), "digits.yaml")
    problems = {p.field: p.message for p in info.value.problems}
    assert set(problems) == {"promotion.approval", "promotion.approval_timeout"}
    assert "'none' or 'required'" in problems["promotion.approval"]
    assert all(p.line for p in info.value.problems)
