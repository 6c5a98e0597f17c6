"""The DAG builder, in-process: one round per DAG run, params, task options, the next-round trigger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import yaml
from airfed.dag.builder import (
    MODEL_EVENT_TASK_ID,
    NEXT_ROUND_TASK_ID,
    TEMPLATED_REFS,
    TIMEOUT_GRACE_SECONDS,
    build_dag,
    model_asset,
    task_options,
)
from airfed.dag.next_round import NextRoundOperator, next_round_conf, next_run_id
from airfed.spec import load_spec, parse_spec_text
from helpers import EXAMPLE_SPEC

from fl_tasks.contract import ROUND_STEPS
from fl_tasks.spec import MAX_SILOS


@pytest.fixture(scope="module")
def spec():
    return load_spec(EXAMPLE_SPEC)


@pytest.fixture(scope="module")
def dag(spec):
    return build_dag(spec, EXAMPLE_SPEC)


def test_one_dag_run_is_one_round_in_step_order_then_the_trigger(dag):
    assert [t.task_id for t in dag.tasks] == [*ROUND_STEPS, MODEL_EVENT_TASK_ID, NEXT_ROUND_TASK_ID]
    for upstream, downstream in zip(dag.tasks, dag.tasks[1:], strict=False):
        assert dag.get_task(downstream.task_id).upstream_task_ids == {upstream.task_id}
    for step in ("train", "validate", "evaluate"):
        task = dag.get_task(step)
        assert type(task).__name__ == "MappedOperator"
        assert [m["silo"] for m in task.expand_input.value] == ["us", "eu", "asia"]
        assert task.partial_kwargs["map_index_template"] == "{{ task.silo }}"
    assert isinstance(dag.get_task(NEXT_ROUND_TASK_ID), NextRoundOperator)
    assert dag.get_task(NEXT_ROUND_TASK_ID).trigger_dag_id == "digits"


def test_dag_options_and_params(dag):
    assert dag.schedule == "0 3 * * *"
    assert dag.catchup is False and dag.max_active_runs == 1 and dag.is_paused_upon_creation is False
    assert set(dag.tags) == {"airfed"}
    rounds = dag.params.get_param("rounds")
    assert rounds.value == 3 and rounds.schema["minimum"] == 1 and rounds.schema["maximum"] == 10
    assert dag.params["training"] == {"local-epochs": 2, "lr": 0.05, "batch-size": 32}


def test_task_options_per_step(spec, dag):
    silo = timedelta(seconds=spec.execution.silo_timeout_seconds + TIMEOUT_GRACE_SECONDS)
    server = timedelta(seconds=spec.execution.server_timeout_seconds + TIMEOUT_GRACE_SECONDS)
    for step in ROUND_STEPS:
        options = task_options(spec, step)
        assert options["task_id"] == step
        assert options["execution_timeout"] == (silo if step in ("train", "validate", "evaluate") else server)
        assert options["retries"] == spec.execution.retries
        assert options["retry_exponential_backoff"] == spec.execution.retry_exponential_backoff
        assert options.get("trigger_rule") == ("all_done" if step in ("validate", "aggregate", "register") else None)
    # the model Asset event comes from the task after register, which reads register's result
    assert all("outlets" not in task_options(spec, step) for step in ROUND_STEPS)
    event = dag.get_task(MODEL_EVENT_TASK_ID)
    assert event.outlets == [model_asset(spec)] and event.upstream_task_ids == {"register"}
    # the next round runs only after register succeeded: a round that did not commit ends the chain
    assert str(dag.get_task(NEXT_ROUND_TASK_ID).trigger_rule) in ("all_success", "TriggerRule.ALL_SUCCESS")


def test_step_argv_templates(dag):
    distribute = dag.get_task("distribute")
    assert distribute.argv[:4] == ["python", "-m", "fl_tasks", "distribute"]
    assert distribute.argv[distribute.argv.index("--round") + 1] == "next"
    assert distribute.argv[distribute.argv.index("--chain-id") + 1] == TEMPLATED_REFS.chain_id
    assert distribute.argv[distribute.argv.index("--training") + 1] == TEMPLATED_REFS.training
    assert "--slot" not in distribute.argv
    train_argv = dag.get_task("train").expand_input.value[0]["argv"]
    assert train_argv[train_argv.index("--round") + 1] == "{{ ti.xcom_pull(task_ids='distribute')['round'] }}"
    assert train_argv[train_argv.index("--run-id") + 1] == "{{ run_id }}"


CHAIN_START = datetime(2026, 1, 1, tzinfo=UTC)


def _context(rounds: int, conf: dict | None = None, run_id: str = "manual__2026-01-01T00:00:00+00:00"):
    return {
        "params": {"rounds": rounds, "training": {"lr": 0.1}},
        "dag_run": SimpleNamespace(conf=conf, run_after=CHAIN_START),
        "run_id": run_id,
    }


def test_next_round_conf_counts_down_and_keeps_the_chain():
    root = _context(3)
    conf = next_round_conf(root)
    assert conf == {"rounds": 2, "training": {"lr": 0.1}, "chain_id": "manual__2026-01-01T00:00:00+00:00"}
    assert next_run_id(conf) == "manual__2026-01-01T00:00:00+00:00__rounds_left_2"
    later = _context(2, conf, run_id=next_run_id(conf))
    assert next_round_conf(later) == {**conf, "rounds": 1}  # the chain id stays the first run's


def test_next_round_triggers_the_same_dag_or_skips_after_the_last_round():
    from airflow.sdk.exceptions import AirflowSkipException, DagRunTriggerException

    op = NextRoundOperator(task_id=NEXT_ROUND_TASK_ID, trigger_dag_id="digits")
    with pytest.raises(AirflowSkipException):
        op.execute(_context(1))
    with pytest.raises(DagRunTriggerException) as trigger:
        op.execute(_context(4))
    exc = trigger.value
    assert exc.trigger_dag_id == "digits"
    assert exc.conf == {"rounds": 3, "training": {"lr": 0.1}, "chain_id": "manual__2026-01-01T00:00:00+00:00"}
    assert exc.dag_run_id == "manual__2026-01-01T00:00:00+00:00__rounds_left_3"
    assert exc.skip_when_already_exists is True  # a retried trigger does not start a second run
    assert exc.wait_for_completion is False
    assert exc.run_after == CHAIN_START and exc.logical_date is None  # the chain keeps its place in the queue


def test_silos_beyond_airflows_map_length_are_a_spec_error(tmp_path):
    data = yaml.safe_load(EXAMPLE_SPEC.read_text())
    data["silos"] = [{"name": f"s{i}", "data": f"/d/{i}.npz"} for i in range(MAX_SILOS + 1)]
    from airfed.spec import SpecError

    with pytest.raises(SpecError) as info:
        parse_spec_text(yaml.safe_dump(data), "big.yaml")
    (problem,) = info.value.problems
    assert problem.field == "silos" and f"at most {MAX_SILOS}" in problem.message
    assert "max_map_length" in problem.message
    data["silos"] = data["silos"][:1000]
    big = parse_spec_text(yaml.safe_dump(data), "big.yaml")
    dag = build_dag(big, "big.yaml")
    assert len(dag.get_task("train").expand_input.value) == 1000 and len(dag.tasks) == 8
