"""Launchers: run a step's argv + env as a process, cold (a subprocess) or warm (forked by a server).

Stdlib only: the Airflow side imports this. Both launchers give the same contract:
``start(argv, env, cwd)`` returns a ``RunningStep`` whose ``lines()`` stream the step's merged
stdout/stderr line by line, ``wait()`` returns the exit code as ``subprocess.Popen.returncode``
(``-N`` when killed by signal N), and ``kill(grace)`` sends SIGTERM to the step's process group,
then SIGKILL after ``grace`` seconds if it is still running.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from fl_tasks.warm import protocol

#: Selects the launcher: "warm" (default) or "subprocess".
LAUNCHER_ENV = "AIRFED_STEP_LAUNCHER"
#: The step environment's interpreter (what argv[0] "python" means): a path, or a shell-split command
#: prefix such as ``/opt/steps/bin/python -X utf8``; default: this interpreter.
PYTHON_ENV = "AIRFED_STEP_PYTHON"
#: Directory of the warm servers' sockets (default ``$AIRFED_HOME/run``).
RUN_DIR_ENV = protocol.RUN_DIR_ENV
#: Seconds a warm server stays up with nothing to do (default 600).
IDLE_TIMEOUT_ENV = "AIRFED_WARM_IDLE_TIMEOUT"
#: Comma-separated modules the warm server imports up front besides the step side (e.g. a client app).
PRELOAD_ENV = "AIRFED_WARM_PRELOAD"

DEFAULT_GRACE = 10.0
log = logging.getLogger("airfed.launch")


def step_python(python: str | Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """What argv[0] ``"python"`` runs: ``python`` if given, else ``AIRFED_STEP_PYTHON`` (shell-split),
    else this interpreter. The one place that decides the step interpreter."""
    if python is None:
        python = (env if env is not None else os.environ).get(PYTHON_ENV) or ""
    prefix = shlex.split(python) if isinstance(python, str) else list(python)
    return prefix or [sys.executable]


def step_command(argv: list[str], python: str | Sequence[str] | None = None) -> list[str]:
    """A StepCall's argv as it is executed: its ``python`` is the step interpreter (``step_python``)."""
    if argv[:1] != ["python"]:
        return list(argv)
    return [*step_python(python), *argv[1:]]


def interpreter_identity(path: str) -> str:
    """One name per interpreter for the server key: ``.venv/bin/python`` and ``.venv/bin/python3.11``
    (what Airflow's task processes report) are the same one. A venv is its bin directory plus the
    binary it links to, so two venvs over one base interpreter stay apart."""
    full = shutil.which(path) or path
    return f"{os.path.realpath(os.path.dirname(full))}:{os.path.realpath(full)}"


class LaunchError(RuntimeError):
    """The launcher could not run or follow the step (not the step's own failure)."""


class WarmUnavailable(LaunchError):
    """No warm server could be reached or started."""


class RunningStep(Protocol):
    pid: int

    def lines(self) -> Iterator[str]: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def poll(self) -> int | None: ...
    def kill(self, grace: float = DEFAULT_GRACE) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> RunningStep: ...
    def __exit__(self, *exc: object) -> None: ...


class Launcher(Protocol):
    def start(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> RunningStep: ...


def _read_lines(fd: int) -> Iterator[str]:
    """Lines of text from a pipe, as ``Popen(text=True)`` gives them (universal newlines, no '\\n')."""
    with open(fd, encoding="utf-8", errors="backslashreplace", newline=None, closefd=False) as stream:
        for line in stream:
            yield line.rstrip("\n")


class _StepBase:
    """Shared by both running-step kinds: the output pipe, the context manager, run-to-completion."""

    pid: int
    _out: int | None

    def lines(self) -> Iterator[str]:
        if self._out is not None:
            yield from _read_lines(self._out)

    def __enter__(self) -> _StepBase:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.poll() is None:
                self.kill()
                try:
                    self.wait(DEFAULT_GRACE + 5)
                except (TimeoutError, LaunchError):
                    pass
        finally:
            self.close()

    def poll(self) -> int | None:
        raise NotImplementedError

    def kill(self, grace: float = DEFAULT_GRACE) -> None:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- subprocess


class SubprocessStep(_StepBase):
    """A step running as ``subprocess.Popen`` in its own session."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid = proc.pid
        self._out = proc.stdout.fileno() if proc.stdout is not None else None
        self._timer: threading.Timer | None = None

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(str(exc)) from None

    def kill(self, grace: float = DEFAULT_GRACE) -> None:
        if self.proc.poll() is not None or self._timer is not None:
            return
        _signal_group(self.pid, signal.SIGTERM)
        self._timer = threading.Timer(grace, self._escalate)
        self._timer.daemon = True
        self._timer.start()

    def _escalate(self) -> None:
        if self.proc.poll() is None:
            _signal_group(self.pid, signal.SIGKILL)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.returncode is None and self.proc.poll() is None:
            self.proc.wait()  # killed by __exit__; never leave a zombie
        self._out = None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class SubprocessLauncher:
    """Today's behaviour: a fresh interpreter per step (``Popen``, new session, merged output).

    python: what argv[0] ``"python"`` means, a path or a command prefix (default: ``step_python()``).
    """

    kind = "subprocess"

    def __init__(self, python: str | Sequence[str] | None = None):
        self.python = step_python(python)

    def command(self, argv: list[str]) -> list[str]:
        return step_command(argv, self.python)

    def start(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> SubprocessStep:
        proc = subprocess.Popen(
            self.command(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True,
        )
        return SubprocessStep(proc)


# ---------------------------------------------------------------- warm


class WarmStep(_StepBase):
    """A step forked by the warm server; its exit code arrives on the control connection."""

    def __init__(self, sock: socket.socket, reader: protocol.FrameReader, out: int, pid: int):
        self.sock = sock
        self.reader = reader
        self._out = out
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._kill_sent = False

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._wait_frame(0.0)
            except TimeoutError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._wait_frame(timeout)
        assert self.returncode is not None
        return self.returncode

    def _wait_frame(self, timeout: float | None) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if not self.reader.pending:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    ready, _, _ = select.select([self.sock], [], [], remaining)
                    if not ready:
                        raise TimeoutError(f"step {self.pid} still running after {timeout}s")
                error: OSError | None
                try:
                    frame = self.reader.read()
                except OSError as exc:
                    frame, error = None, exc
                else:
                    error = None
                if frame is None:
                    # The server went away: make sure the step does not outlive it, then report.
                    _signal_group(self.pid, signal.SIGKILL)
                    raise LaunchError(f"warm server connection lost while step {self.pid} ran: {error or 'EOF'}")
                if "exit" in frame:
                    self.returncode = int(frame["exit"])
                    return

    def kill(self, grace: float = DEFAULT_GRACE) -> None:
        """Ask the server to kill the step's process group (safe from a signal handler)."""
        if self.returncode is not None or self._kill_sent:
            return
        self._kill_sent = True
        try:
            self.sock.sendall(protocol.encode({"kill": grace}))
        except OSError:
            _signal_group(self.pid, signal.SIGTERM)

    def close(self) -> None:
        if self._out is not None:
            os.close(self._out)
            self._out = None
        self.sock.close()  # if the step still runs, the server kills it


class WarmLauncher:
    """Runs ``python -m module ...`` argv by asking a warm step server to fork it.

    python: the step environment's interpreter (a path or a command prefix such as
        ``python -X utf8``, which then starts the server); argv[0] ``"python"`` means it (default
        ``step_python()``). Another absolute interpreter path in argv[0] gets its own server.
    home: directory holding ``run/warm-<key>.sock`` (default ``AIRFED_WARM_DIR`` or
        ``$AIRFED_HOME/run`` of the step env).
    idle_timeout: seconds an idle server lives (default ``AIRFED_WARM_IDLE_TIMEOUT`` or 600).
    preload: extra modules the server imports up front (default ``AIRFED_WARM_PRELOAD``).
    default_preload: import the step side (torch, flwr, mlflow, the step modules) up front; False
        gives a server that starts in a fraction of a second (lifecycle tests).
    fallback: if no server can be started, run the step as a subprocess and log a warning (True),
        or raise ``WarmUnavailable`` (False).
    start_timeout: seconds to wait for a new server to finish its imports.
    """

    def __init__(
        self,
        python: str | Sequence[str] | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        idle_timeout: float | None = None,
        preload: tuple[str, ...] | None = None,
        default_preload: bool = True,
        fallback: bool = True,
        start_timeout: float = 120.0,
    ):
        self.python = step_python(python)
        self.default_preload = default_preload
        self.home = Path(home) if home is not None else None
        self.idle_timeout = idle_timeout if idle_timeout is not None else float(
            os.environ.get(IDLE_TIMEOUT_ENV) or 600
        )
        if preload is None:
            preload = tuple(m.strip() for m in os.environ.get(PRELOAD_ENV, "").split(",") if m.strip())
        self.preload = preload
        self.fallback = fallback
        self.start_timeout = start_timeout
        self.cold = SubprocessLauncher(self.python)

    # -- where the server lives

    kind = "warm"

    def interpreter(self, argv: list[str]) -> list[str]:
        """The command prefix that starts the server for ``argv`` (``python`` → the step interpreter)."""
        return list(self.python) if argv[0] == "python" else [argv[0]]

    def run_dir(self, env: dict[str, str]) -> Path:
        if self.home is not None:
            return self.home / "run"
        return protocol.run_dir(env)

    def socket_path(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> Path:
        interpreter = self.interpreter(argv)
        python = shlex.join([interpreter_identity(interpreter[0]), *interpreter[1:]])
        cwd = os.path.realpath(cwd or os.getcwd())
        preload = self.preload if self.default_preload else ("--no-default-preload", *self.preload)
        return protocol.socket_path(self.run_dir(env), protocol.server_key(python, env, cwd, preload))

    # -- running

    def start(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> RunningStep:
        if len(argv) < 3 or argv[1] != "-m":
            return self.cold.start(argv, env, cwd)  # only `python -m module ...` runs warm
        cwd = os.path.realpath(cwd or os.getcwd())
        path = self.socket_path(argv, env, cwd)
        request = {"op": "run", "argv": [self.interpreter(argv)[0], *argv[1:]], "env": dict(env), "cwd": cwd}
        last_error = "no attempt"
        for _attempt in range(4):
            try:
                sock = self._connect_or_start(path, argv, env, cwd)
            except WarmUnavailable as exc:
                if not self.fallback:
                    raise
                log.warning("warm step server unavailable, running the step as a subprocess: %s", exc)
                return self.cold.start(argv, env, cwd)
            step, last_error = self._submit(sock, request)
            if step is not None:
                return step
        raise LaunchError(f"warm step server at {path} refused the step: {last_error}")

    def _submit(self, sock: socket.socket, request: dict) -> tuple[WarmStep | None, str]:
        """Send the request with a fresh pipe; (step, '') once started, (None, why) to retry."""
        out_r, out_w = os.pipe()
        try:
            reader = protocol.FrameReader(sock)
            try:
                try:
                    protocol.send(sock, request, [out_w, out_w])
                finally:
                    os.close(out_w)
                frame = reader.read()
            except OSError as exc:  # e.g. the server closed on us while stopping (idle, changed code)
                frame = {"error": f"connection failed: {exc}", "retry": True}
            if frame is None:
                frame = {"error": "server closed the connection before starting the step", "retry": True}
            if "pid" in frame:
                return WarmStep(sock, reader, out_r, int(frame["pid"])), ""
        except BaseException:
            os.close(out_r)
            sock.close()
            raise
        os.close(out_r)
        sock.close()
        if not frame.get("retry"):
            raise LaunchError(f"warm step server refused the step: {frame.get('error')}")
        return None, str(frame.get("error"))

    # -- lifecycle

    def _connect(self, path: Path) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise WarmUnavailable(f"cannot connect to {path}: {exc}") from exc
        return sock

    def _connect_or_start(self, path: Path, argv: list[str], env: dict[str, str], cwd: str) -> socket.socket:
        sock = self._connect(path)
        if sock is not None:
            return sock
        try:
            protocol.private_dir(path.parent)
        except OSError as exc:
            raise WarmUnavailable(str(exc)) from exc
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one caller starts the server; the others then connect
            sock = self._connect(path)
            if sock is not None:
                return sock
            try:
                path.unlink()  # a stale socket: nobody answers on it (we hold the start lock)
            except FileNotFoundError:
                pass
            self._start_server(path, argv, env, cwd)
        sock = self._connect(path)
        if sock is None:
            raise WarmUnavailable(f"the warm server at {path} started but does not answer")
        return sock

    def server_env(self, env: dict[str, str]) -> dict[str, str]:
        """The server's own environment: start-up variables of the step env, nothing secret."""
        base = {k: v for k, v in os.environ.items() if k in protocol.SERVER_ENV_NAMES}
        base.update({k: v for k, v in env.items() if k in protocol.SERVER_ENV_NAMES})
        return {**base, **protocol.startup_env(env)}

    def _start_server(self, path: Path, argv: list[str], env: dict[str, str], cwd: str) -> None:
        ready_r, ready_w = os.pipe()
        command = [
            *self.interpreter(argv), "-m", "fl_tasks.warm", "serve", "--daemon", "--socket", os.fspath(path),
            "--idle-timeout", str(self.idle_timeout), "--ready-fd", str(ready_w), "--preload", ",".join(self.preload),
        ]
        if not self.default_preload:
            command.append("--no-default-preload")
        log_path = path.with_suffix(".log")
        try:
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    env=self.server_env(env), cwd=cwd, pass_fds=(ready_w,), start_new_session=True,
                )
        except OSError as exc:
            os.close(ready_r)
            raise WarmUnavailable(f"cannot start {command[0]}: {exc}") from exc
        finally:
            os.close(ready_w)
        try:
            proc.wait(timeout=self.start_timeout)  # the intermediate exits right after detaching
            answer = b""
            deadline = time.monotonic() + self.start_timeout
            while not answer.endswith(b"\n"):
                ready, _, _ = select.select([ready_r], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise WarmUnavailable(f"warm server did not become ready within {self.start_timeout:g}s")
                chunk = os.read(ready_r, 4096)
                if not chunk:
                    break
                answer += chunk
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise WarmUnavailable("warm server did not detach") from None
        finally:
            os.close(ready_r)
        if answer.strip() != b"ok":
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise WarmUnavailable(f"warm server failed to start ({answer.decode().strip() or 'exited'}): {tail}")

    def warm_up(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> bool:
        """Start (or find) the server that would run ``argv`` with ``env``; True once it answers.

        Lets a caller pay the server's imports while it does other work (``airfed run`` migrates
        Airflow's DB meanwhile). Never raises: a server that cannot start is the steps' concern.
        """
        if len(argv) < 3 or argv[1] != "-m":
            return False
        cwd = os.path.realpath(cwd or os.getcwd())
        try:
            sock = self._connect_or_start(self.socket_path(argv, env, cwd), argv, env, cwd)
        except (WarmUnavailable, OSError) as exc:
            log.warning("warm step server could not be started: %s", exc)
            return False
        sock.close()
        return True

    def stop(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> bool:
        """Ask the server for this argv/env to stop accepting steps (running ones finish)."""
        return request_op(self.socket_path(argv, env, cwd), "stop") is not None

    def ping(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> dict | None:
        return request_op(self.socket_path(argv, env, cwd), "ping")


def request_op(path: Path, op: str) -> dict | None:
    """Send ``ping``/``stop`` to the server at ``path``; None if none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        return None
    with sock:
        protocol.send(sock, {"op": op})
        return protocol.FrameReader(sock).read()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it has exited and waits only to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def stop_servers(run_dir: str | os.PathLike[str], timeout: float = 30.0) -> list[int]:
    """Stop every warm server listening in ``run_dir``; the pids of the servers that were running.

    Each is asked to ``stop`` (it stops accepting; a running step finishes), then, after
    ``timeout`` seconds, sent SIGTERM (its running steps get SIGTERM too) and finally SIGKILL.
    """
    pids = []
    for path in protocol.socket_paths(Path(run_dir)):
        status = request_op(path, "ping")
        if status is None:
            continue
        request_op(path, "stop")
        pids.append(int(status["pid"]))
    deadline = time.monotonic() + timeout
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            for pid in pids:
                if process_alive(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 10.0
        while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(process_alive(pid) for pid in pids):
            break
    return pids


def run(
    launcher: Launcher, argv: list[str], env: dict[str, str], cwd: str | None = None,
    on_line: Callable[[str], None] = print,
) -> int:
    """Run a step to completion, passing each output line to ``on_line``; the exit code."""
    with launcher.start(argv, env, cwd) as step:
        for line in step.lines():
            on_line(line)
        return step.wait()


def launcher_from_env(env: Mapping[str, str] | None = None) -> SubprocessLauncher | WarmLauncher:
    """The launcher ``AIRFED_STEP_LAUNCHER`` selects: ``warm`` (default) or ``subprocess``;
    ``AIRFED_STEP_PYTHON`` the step interpreter (see ``step_python``)."""
    env = os.environ if env is None else env
    kind = (env.get(LAUNCHER_ENV) or "warm").strip().lower()
    python = step_python(None, env)
    if kind == "subprocess":
        return SubprocessLauncher(python)
    if kind == "warm":
        preload = tuple(m.strip() for m in env.get(PRELOAD_ENV, "").split(",") if m.strip())
        idle = float(env[IDLE_TIMEOUT_ENV]) if env.get(IDLE_TIMEOUT_ENV) else None
        return WarmLauncher(python, idle_timeout=idle, preload=preload)
    raise ValueError(f"{LAUNCHER_ENV}={kind!r}: expected 'warm' or 'subprocess'")
