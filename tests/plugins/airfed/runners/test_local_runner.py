"""The local runner in-process: the step interpreter, the StepCall as a (mapped) task."""

from __future__ import annotations

import sys

from airfed.runners.local import STEP_PYTHON_ENV, LocalStepOperator, local_task, step_command
from helpers import EXAMPLE_SPEC


def test_step_command_runs_python_as_the_step_interpreter(monkeypatch):
    monkeypatch.delenv(STEP_PYTHON_ENV, raising=False)
    assert step_command(["python", "-m", "fl_tasks", "train"]) == [sys.executable, "-m", "fl_tasks", "train"]
    monkeypatch.setenv(STEP_PYTHON_ENV, "/opt/steps/bin/python -X utf8")
    assert step_command(["python", "-m", "fl_tasks"]) == ["/opt/steps/bin/python", "-X", "utf8", "-m", "fl_tasks"]
    assert step_command(["/bin/true"]) == ["/bin/true"]


def test_server_steps_are_tasks_and_silo_steps_map_over_silos():
    from airfed.dag.builder import TEMPLATED_REFS, task_options
    from airfed.dag.step_calls import round_calls
    from airfed.spec import load_spec
    from airflow.sdk import DAG

    spec = load_spec(EXAMPLE_SPEC)
    calls = round_calls(spec, TEMPLATED_REFS)
    with DAG("local_runner_test", schedule=None):
        aggregate = local_task("aggregate", calls["aggregate"], task_options(spec, "aggregate"))
        train = local_task("train", calls["train"], task_options(spec, "train"))
    assert isinstance(aggregate, LocalStepOperator) and aggregate.argv == calls["aggregate"].argv
    assert aggregate.template_fields == ("argv",)  # the env (spec JSON, any braces) is never templated
    assert [m["silo"] for m in train.expand_input.value] == ["us", "eu", "asia"]
    assert [m["env"] for m in train.expand_input.value] == [c.env for c in calls["train"]]
