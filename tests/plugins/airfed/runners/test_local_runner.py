"""The local runner: the StepCall as a (mapped) task, and what the runner adds on top of a launcher.

The launcher's own fault tests (crash, hang, kill, leaks, zombies) live in
``tests/fl_tasks/test_launch.py``. Here every behaviour the runner adds runs through
``LocalStepOperator`` on both launchers (``AIRFED_STEP_LAUNCHER=warm|subprocess``): exit code → task
state, result file → XCom, output → task log, ``on_kill`` and Airflow's ``execution_timeout`` →
the step's process group killed, a step's leaked state never reaching the next step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest
from airfed.runners.local import LocalStepOperator, local_task
from airflow.sdk.exceptions import AirflowException, AirflowSkipException
from helpers import EXAMPLE_SPEC, REPO, TESTS, gone, stop_warm_servers
from recorded_operator import RecordedStepOperator

from fl_tasks.warm import SubprocessLauncher, WarmLauncher, launcher_from_env, step_command, step_python

HELPER = ["python", "-m", "airfed_step_helper"]
HELPER_PATH = str(TESTS / "fl_tasks")


def test_step_command_runs_python_as_the_step_interpreter(monkeypatch):
    monkeypatch.delenv("AIRFED_STEP_PYTHON", raising=False)
    assert step_command(["python", "-m", "fl_tasks", "train"]) == [sys.executable, "-m", "fl_tasks", "train"]
    monkeypatch.setenv("AIRFED_STEP_PYTHON", "/opt/steps/bin/python -X utf8")
    assert step_command(["python", "-m", "fl_tasks"]) == ["/opt/steps/bin/python", "-X", "utf8", "-m", "fl_tasks"]
    assert step_command(["/bin/true"]) == ["/bin/true"]
    # one place decides it: both launchers take the prefix from there
    for launcher in (launcher_from_env({"AIRFED_STEP_LAUNCHER": "subprocess", "AIRFED_STEP_PYTHON": "/p -X utf8"}),
                     launcher_from_env({"AIRFED_STEP_PYTHON": "/p -X utf8"})):
        assert launcher.python == ["/p", "-X", "utf8"] == step_python(None, {"AIRFED_STEP_PYTHON": "/p -X utf8"})


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


# ---------------------------------------------------------------- both launchers through the runner


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runner-warm")
    yield run_dir
    stop_warm_servers(run_dir)


@pytest.fixture(params=["subprocess", "warm"])
def launcher_kind(request, monkeypatch, warm_dir, tmp_path) -> str:
    monkeypatch.setenv("AIRFED_STEP_LAUNCHER", request.param)
    monkeypatch.setenv("AIRFED_WARM_DIR", str(warm_dir))  # one server for the module's warm tests
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HELPER_PATH, str(REPO)]))
    return request.param


def helper_task(*args: str, **kwargs) -> RecordedStepOperator:
    return RecordedStepOperator(task_id="helper", step="train", argv=[*HELPER, *args], env=kwargs.pop("env", {}),
                                silo=kwargs.pop("silo", "us"), **kwargs)


def run_logged(task: RecordedStepOperator) -> tuple[object, list[str]]:
    result = task.execute({})
    return result, task.log.messages




def test_the_launcher_is_the_one_the_env_selects(launcher_kind):
    first = run_logged(helper_task("ok", "1"))[1][0]
    assert first.startswith(f"Running {sys.executable} -m airfed_step_helper ok 1")
    assert first.endswith(f"({launcher_kind})")
    expected = WarmLauncher if launcher_kind == "warm" else SubprocessLauncher
    assert isinstance(launcher_from_env(), expected)


def test_result_file_becomes_the_xcom_and_output_reaches_the_task_log(launcher_kind):
    result, log = run_logged(helper_task("ok", "2", env={"STEP_VAR": "from the StepCall"}))
    assert result["argv"] == ["ok", "2"] and result["name"] == "__main__" and result["cwd"] == os.getcwd()
    assert log[1:] == ["line 0", "line 1", "to stderr", "no newline at the end"]


def test_the_step_env_is_the_workers_env_plus_the_stepcall_env(launcher_kind):
    state = json.loads(run_logged(helper_task("probe", env={"STEP_VAR": "x"}))[1][-1])
    expected = set(os.environ) | {"STEP_VAR", "AIRFED_RESULT_FILE"}
    assert set(state["env_keys"]) == expected


def test_exit_99_skips_the_task(launcher_kind):
    with pytest.raises(AirflowSkipException, match="^step train had nothing to do$"):  # it printed nothing
        helper_task("exit", "99").execute({})


@pytest.mark.parametrize(("args", "code", "last_line"), [
    (("raise",), 1, "ValueError: boom from the step"),
    (("os_exit",), 3, "about to _exit"),
    (("segfault",), -signal.SIGSEGV, None),
    (("alarm", "1"), 1, "TimeoutError: timed out after 1s"),  # the step's own timeout (SIGALRM)
])
def test_a_failing_step_fails_the_task_naming_step_silo_code_and_output(launcher_kind, args, code, last_line):
    with pytest.raises(AirflowException) as failed:
        helper_task(*args).execute({})
    message = str(failed.value)
    assert message.startswith(f"step train (silo us) exited with code {code}; last output:")
    if last_line:
        assert message.endswith(last_line)


def test_leaked_state_does_not_reach_the_next_task(launcher_kind):
    assert run_logged(helper_task("leak"))[1][-1] == "leaked"
    state = json.loads(run_logged(helper_task("probe"))[1][-1])
    assert state["leaked_env"] is None and state["skip_code"] == 99
    assert not state["leaked_module"] and not state["leaked_path"]
    assert state["cwd"] == os.getcwd() and state["sigusr1_default"]
    assert os.getcwd() == str(REPO) and "AIRFED_LEAKED" not in os.environ  # nor the worker itself


def test_on_kill_kills_the_steps_process_group(launcher_kind, tmp_path):
    pid_file = tmp_path / "pids"
    task = helper_task("hang", env={"HELPER_PID_FILE": str(pid_file)})
    outcome: list[BaseException] = []

    def execute() -> None:
        try:
            task.execute({})
        except BaseException as exc:  # what the task raised is the assertion
            outcome.append(exc)

    thread = threading.Thread(target=execute)
    thread.start()
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    step_pid, grandchild = map(int, pid_file.read_text().split())
    task.on_kill()
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(outcome[0], AirflowException) and f"exited with code {-signal.SIGTERM}" in str(outcome[0])
    assert gone(step_pid) and gone(grandchild)


def test_execution_timeout_kills_the_steps_process_group(launcher_kind, tmp_path):
    """Airflow's execution_timeout raises AirflowTaskTimeout in the task (by SIGALRM): the step dies with it."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    def expire(_signum, _frame):
        raise AirflowTaskTimeout("Timeout, PID: test")

    pid_file = tmp_path / "pids"
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(3)
    started = time.monotonic()
    try:
        with pytest.raises(AirflowTaskTimeout):
            helper_task("hang", env={"HELPER_PID_FILE": str(pid_file)}).execute({})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 30
    step_pid, grandchild = map(int, pid_file.read_text().split())
    assert gone(step_pid) and gone(grandchild)
