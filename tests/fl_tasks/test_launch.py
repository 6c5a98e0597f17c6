"""The two step launchers (fresh subprocess, warm fork server) pass the same fault tests.

Every step here is a real program run by argv: ``python -m airfed_step_helper <behaviour>`` (a
step-like module next to this file) for the faults, and ``python -m fl_tasks distribute/train``
for the real-step check that both paths commit byte-identical weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import gone

from fl_tasks.warm import LaunchError, SubprocessLauncher, WarmLauncher, WarmUnavailable, launcher_from_env, run
from fl_tasks.warm.launch import SubprocessStep

HERE = str(Path(__file__).resolve().parent)
HELPER = ["python", "-m", "airfed_step_helper"]


def base_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_", "MLFLOW_", "AIRFLOW"))}
    return {**env, "AIRFED_HOME": str(home), **extra}


def zombies_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found




def stop_server(launcher: WarmLauncher, env: dict[str, str], cwd: str = HERE) -> None:
    status = launcher.ping(HELPER, env, cwd)
    if status:
        launcher.stop(HELPER, env, cwd)
        assert gone(status["pid"], 30)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch") / "home"


@pytest.fixture(scope="module", params=["subprocess", "warm"])
def launcher(request, home):
    if request.param == "subprocess":
        yield SubprocessLauncher()
        return
    warm = WarmLauncher(idle_timeout=300, fallback=False)
    yield warm
    stop_server(warm, base_env(home))


@pytest.fixture
def env(home, tmp_path) -> dict[str, str]:
    return base_env(home, AIRFED_RESULT_FILE=str(tmp_path / "result.json"))


def run_helper(launcher, env, *args: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run(launcher, [*HELPER, *args], env, HERE, on_line=lines.append)
    return code, lines


# ---------------------------------------------------------------- the same faults, both launchers


def test_success_streams_output_and_writes_the_result_file(launcher, env):
    code, lines = run_helper(launcher, env, "ok", "3")
    assert code == 0
    assert lines == ["line 0", "line 1", "line 2", "to stderr", "no newline at the end"]
    result = json.loads(Path(env["AIRFED_RESULT_FILE"]).read_text())
    assert result["argv"] == ["ok", "3"] and result["name"] == "__main__" and result["cwd"] == HERE


def test_lines_stream_while_the_step_runs(launcher, env):
    with launcher.start([*HELPER, "hang"], env, HERE) as step:
        first = next(iter(step.lines()))  # arrives long before the step ends
        assert first.startswith("grandchild ")
        step.kill(grace=2)
        assert step.wait(30) == -signal.SIGTERM


def test_skip_exit_code(launcher, env):
    assert run_helper(launcher, env, "exit", "99")[0] == 99


def test_system_exit_with_a_message(launcher, env):
    code, lines = run_helper(launcher, env, "exit", "bad --training value")
    assert code == 1 and lines == ["bad --training value"]


def test_uncaught_exception_exits_1_with_a_traceback(launcher, env):
    code, lines = run_helper(launcher, env, "raise")
    assert code == 1
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom from the step"
    assert "server.py" not in "\n".join(lines)  # the warm server's own frames are not shown


def test_os_exit(launcher, env):
    assert run_helper(launcher, env, "os_exit") == (3, ["about to _exit"])


def test_segfault(launcher, env):
    assert run_helper(launcher, env, "segfault")[0] == -signal.SIGSEGV


def test_kill_reaches_the_whole_process_group(launcher, env):
    with launcher.start([*HELPER, "hang"], env, HERE) as step:
        lines = step.lines()
        grandchild = int(next(lines).split()[1])
        step.kill(grace=5)
        assert list(lines) == []  # the pipe closes once the group is gone
        assert step.wait(30) == -signal.SIGTERM
    assert gone(step.pid) and gone(grandchild)


def test_kill_escalates_to_sigkill(launcher, env):
    with launcher.start([*HELPER, "ignore_term"], env, HERE) as step:
        assert next(iter(step.lines())) == "ignoring SIGTERM"
        step.kill(grace=0.5)
        assert step.wait(30) == -signal.SIGKILL


def test_step_timeout_by_sigalrm(launcher, env):
    started = time.monotonic()
    code, lines = run_helper(launcher, env, "alarm", "1")
    assert code == 1 and lines[-1] == "TimeoutError: timed out after 1s"
    assert time.monotonic() - started < 15


def test_interpreter_shutdown_joins_threads_then_runs_atexit(launcher, env):
    assert run_helper(launcher, env, "shutdown") == (0, ["main finished", "thread finished", "atexit handler ran"])


def test_leaked_state_does_not_reach_the_next_step(launcher, env):
    assert run_helper(launcher, env, "leak") == (0, ["leaked"])
    code, lines = run_helper(launcher, env, "probe")
    assert code == 0
    state = json.loads(lines[-1])
    assert state["leaked_env"] is None
    assert state["skip_code"] == 99
    assert not state["leaked_module"] and not state["leaked_path"]
    assert state["cwd"] == HERE and state["sigusr1_default"] and state["name"] == "__main__"
    assert state["env_keys"] == sorted(env)  # exactly the request env, as with Popen(env=...)


def test_random_state_is_fresh_per_step(launcher, env):
    first = json.loads(run_helper(launcher, env, "probe")[1][-1])
    second = json.loads(run_helper(launcher, env, "probe")[1][-1])
    assert first["random"] != second["random"]
    assert first["numpy_random"] != second["numpy_random"]


def test_concurrent_steps_overlap(launcher, env):
    steps = [launcher.start([*HELPER, "sleep", "1.5"], env, HERE) for _ in range(4)]
    spans = []
    for step in steps:
        with step:
            spans.append(json.loads(list(step.lines())[-1]))
            assert step.wait(30) == 0
    assert max(s["start"] for s in spans) < min(s["end"] for s in spans)


def test_no_zombies_left(launcher, env):
    run_helper(launcher, env, "os_exit")
    run_helper(launcher, env, "segfault")
    assert zombies_of(os.getpid()) == []
    if isinstance(launcher, WarmLauncher):
        status = launcher.ping(HELPER, env, HERE)
        assert status["children"] == []
        assert zombies_of(status["pid"]) == []


# ---------------------------------------------------------------- warm server: lifecycle, isolation


@pytest.fixture
def warm(tmp_path):
    """A warm launcher with a server of its own (a fresh AIRFED_HOME); minimal preload: these tests are
    about the server's life, and a server that imports only the launcher starts in a fraction of a second."""
    launcher = WarmLauncher(idle_timeout=120, fallback=False, default_preload=False)
    env = base_env(tmp_path / "home", AIRFED_RESULT_FILE=str(tmp_path / "result.json"))
    yield launcher, env
    stop_server(launcher, env)


def test_server_has_one_thread_and_preloaded_the_step_side(launcher, env):
    if not isinstance(launcher, WarmLauncher):
        pytest.skip("warm server only")
    status = launcher.ping(HELPER, env, HERE)
    assert status["python_threads"] == 1
    assert {"torch", "mlflow", "flwr.clientapp", "fl_tasks.steps.train"} <= set(status["preloaded"])
    assert Path(status["socket"]).parent == Path(env["AIRFED_HOME"]) / "run"


def test_a_server_closing_on_the_request_is_retried_then_refused_clearly(tmp_path, monkeypatch):
    """A server that closes the connection before the request arrives (stopping: idle, changed code) is an
    attempt to retry, not a BrokenPipeError out of the launcher; one that always does is a LaunchError."""
    import socket

    from fl_tasks.warm import protocol

    send = protocol.send

    def send_once_closed(sock, *args):  # the request leaves after the server closed the connection
        time.sleep(0.2)
        return send(sock, *args)

    monkeypatch.setattr(protocol, "send", send_once_closed)

    launcher = WarmLauncher(idle_timeout=120, fallback=False, default_preload=False)
    env = base_env(tmp_path / "home")
    path = launcher.socket_path(HELPER, env, HERE)
    protocol.private_dir(path.parent)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    accepted = []

    def close_each_connection() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.close()

    threading.Thread(target=close_each_connection, daemon=True).start()
    try:
        with pytest.raises(LaunchError, match="refused the step"):
            launcher.start([*HELPER, "ok"], env, HERE)
        assert len(accepted) == 4  # every attempt connected, and was retried
    finally:
        listener.close()
        path.unlink()


def test_server_restarts_after_being_killed(warm):
    launcher, env = warm
    assert run_helper(launcher, env, "ok", "1")[0] == 0
    first = launcher.ping(HELPER, env, HERE)
    os.kill(first["pid"], signal.SIGKILL)
    assert gone(first["pid"])
    assert Path(first["socket"]).exists()  # stale: nobody answers on it
    assert run_helper(launcher, env, "ok", "1")[0] == 0
    second = launcher.ping(HELPER, env, HERE)
    assert second["pid"] != first["pid"]


def test_stop_servers_finds_a_server_whose_socket_moved_under_tmp(tmp_path):
    """A deep AIRFED_HOME: the socket path would pass the kernel's limit, so it lives under /tmp instead;
    ``stop_servers`` (what ``airfed up`` calls at exit) must still find and stop it."""
    from fl_tasks.warm import stop_servers

    home = tmp_path / ("deep-" * 20)
    launcher = WarmLauncher(idle_timeout=120, fallback=False, default_preload=False)
    env = base_env(home, AIRFED_RESULT_FILE=str(tmp_path / "result.json"))
    assert run_helper(launcher, env, "ok", "1")[0] == 0
    status = launcher.ping(HELPER, env, HERE)
    assert not Path(status["socket"]).is_relative_to(home)
    assert stop_servers(home / "run", timeout=20) == [status["pid"]]
    assert gone(status["pid"], 30)


def test_server_survives_its_caller(warm):
    launcher, env = warm
    code = (
        "import os, sys; from fl_tasks.warm import WarmLauncher, run; "
        "launcher = WarmLauncher(idle_timeout=120, fallback=False, default_preload=False); "
        f"sys.exit(run(launcher, {HELPER!r} + ['ok', '1'], "
        f"{env!r}, {HERE!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    status = launcher.ping(HELPER, env, HERE)
    assert status is not None and status["requests"] == 1


def test_concurrent_first_use_starts_one_server(warm):
    launcher, env = warm
    codes: list[int] = []

    def one() -> None:
        launcher = WarmLauncher(idle_timeout=120, fallback=False, default_preload=False)
        codes.append(run_helper(launcher, env, "ok", "1")[0])

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert codes == [0, 0, 0]
    # one server took all three: a second one would have replaced the socket and lost requests
    status = launcher.ping(HELPER, env, HERE)
    assert status["requests"] == 3 and Path(status["socket"]) == launcher.socket_path(HELPER, env, HERE)


def test_client_disconnect_kills_the_step(warm):
    launcher, env = warm
    step = launcher.start([*HELPER, "hang"], env, HERE)
    grandchild = int(next(iter(step.lines())).split()[1])
    step.sock.close()  # the caller vanishes without a word
    assert gone(step.pid, 20) and gone(grandchild, 20)
    status = launcher.ping(HELPER, env, HERE)
    deadline = time.monotonic() + 10
    while status["children"] and time.monotonic() < deadline:
        time.sleep(0.1)
        status = launcher.ping(HELPER, env, HERE)
    assert status["children"] == [] and zombies_of(status["pid"]) == []
    step.close()


def test_idle_server_exits_and_removes_its_socket(tmp_path):
    launcher = WarmLauncher(idle_timeout=1, fallback=False, default_preload=False)
    env = base_env(tmp_path / "home")
    assert run_helper(launcher, env, "os_exit")[0] == 3
    status = launcher.ping(HELPER, env, HERE)
    assert gone(status["pid"], 30)
    assert not Path(status["socket"]).exists()


def test_changed_code_starts_a_new_server(tmp_path):
    """A module of the project (here one of the test's own, preloaded) changes on disk: the next step
    runs on a new server. Not a file of the repository: every other server of the run imported those."""
    code = tmp_path / "code"
    code.mkdir()
    source = code / "project_module.py"
    source.write_text("VALUE = 1\n")
    launcher = WarmLauncher(idle_timeout=120, fallback=False, default_preload=False, preload=("project_module",))
    env = base_env(tmp_path / "home", AIRFED_RESULT_FILE=str(tmp_path / "result.json"),
                   PYTHONPATH=os.pathsep.join([str(code), HERE]))
    try:
        run_helper(launcher, env, "os_exit")
        first = launcher.ping(HELPER, env, HERE)
        assert "project_module" in first["preloaded"]
        st = source.stat()
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert run_helper(launcher, env, "os_exit")[0] == 3
        assert launcher.ping(HELPER, env, HERE)["pid"] != first["pid"]
        assert gone(first["pid"], 30)
    finally:
        stop_server(launcher, env)


def test_unavailable_server_falls_back_or_raises(tmp_path):
    # a short home: a socket path over the AF_UNIX limit would move to a private temp directory instead
    home = Path(tempfile.mkdtemp(prefix="af", dir="/tmp"))
    (home / "run").write_text("not a directory")
    env = base_env(home)
    with WarmLauncher(fallback=True, default_preload=False).start([*HELPER, "os_exit"], env, HERE) as step:
        assert isinstance(step, SubprocessStep)
        assert step.wait(60) == 3
    with pytest.raises(WarmUnavailable):
        WarmLauncher(fallback=False, default_preload=False).start([*HELPER, "os_exit"], env, HERE)


def test_refused_request_raises(warm):
    launcher, env = warm
    with pytest.raises(LaunchError, match="env must map strings to strings"):
        launcher.start([*HELPER, "ok"], {**env, "NOT_A_STRING": 1}, HERE)


def test_interpreter_prefix_starts_the_server_and_keys_it(tmp_path):
    """``AIRFED_STEP_PYTHON="python -X utf8"``: the warm server runs with the flag, as a cold step would."""
    env = base_env(tmp_path / "home")
    prefixed = WarmLauncher(f"{sys.executable} -X utf8", idle_timeout=60, fallback=False, default_preload=False)
    plain = WarmLauncher(idle_timeout=60, fallback=False, default_preload=False)
    assert prefixed.socket_path(HELPER, env, HERE) != plain.socket_path(HELPER, env, HERE)
    assert run(prefixed, ["python", "-c", "pass"], env, HERE) == 0  # not `-m`: runs cold
    for launcher in (SubprocessLauncher(f"{sys.executable} -X utf8"), prefixed):
        out: list[str] = []
        assert run(launcher, [*HELPER, "probe"], env, HERE, on_line=out.append) == 0
        assert json.loads(out[-1])["utf8_mode"] == 1
    stop_server(prefixed, env)


def test_thread_settings_match_a_fresh_process(tmp_path):
    """*_NUM_THREADS key the server, so torch in a warm child sizes its pools like a fresh process."""
    warm = WarmLauncher(idle_timeout=60, fallback=False)
    for extra in ({}, {"OMP_NUM_THREADS": "1"}):
        env = base_env(tmp_path / "home", **extra)
        outputs = [run_helper(launcher, env, "threads") for launcher in (SubprocessLauncher(), warm)]
        assert outputs[0] == outputs[1] and outputs[0][0] == 0, outputs
        stop_server(warm, env)


def test_launcher_from_env():
    assert isinstance(launcher_from_env({}), WarmLauncher)
    assert isinstance(launcher_from_env({"AIRFED_STEP_LAUNCHER": "subprocess"}), SubprocessLauncher)
    chosen = launcher_from_env({"AIRFED_STEP_LAUNCHER": "warm", "AIRFED_STEP_PYTHON": "/x/python",
                                "AIRFED_WARM_PRELOAD": "examples.digits.client_app", "AIRFED_WARM_IDLE_TIMEOUT": "5"})
    assert (chosen.python, chosen.preload, chosen.idle_timeout) == (["/x/python"], ("examples.digits.client_app",), 5.0)
    with pytest.raises(ValueError):
        launcher_from_env({"AIRFED_STEP_LAUNCHER": "docker"})


def test_launcher_package_is_light():
    code = (
        "import sys, fl_tasks.warm; fl_tasks.warm.launcher_from_env(); "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr', 'mlflow', 'numpy', 'airflow')]; "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# (real steps on both paths: tests/e2e/test_launcher_globals.py, the committed globals of 2 rounds)


def test_a_preloaded_step_module_runs_without_runpys_warning(launcher, home):
    """The warm server imported ``fl_tasks.__main__`` before forking; a step's output is still what
    ``python -m fl_tasks`` prints in a fresh interpreter, with no "found in sys.modules" warning."""
    lines: list[str] = []
    code = run(launcher, ["python", "-m", "fl_tasks", "--help"], base_env(home), HERE,
               on_line=lines.append)
    assert code == 0 and any("usage" in line for line in lines), lines
    assert not [line for line in lines if "RuntimeWarning" in line or "found in sys.modules" in line], lines
