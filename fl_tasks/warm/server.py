"""The warm step server: imports the step side once, then forks one isolated child per step.

Design (why it is fork-safe):
- One thread. A ``selectors`` loop accepts connections, reads requests, forks, and learns exit
  codes from ``waitpid`` (SIGCHLD only wakes the loop through ``signal.set_wakeup_fd``). No
  Python thread ever exists in the parent, so a child never inherits a lock held by another thread.
- The parent only imports. It never runs a tensor op, opens an MLflow client or touches a store,
  so torch's OpenMP/intra-op pools are never started before a fork. The native threads some
  libraries start *at import* (OpenBLAS's pool, Arrow's jemalloc background thread) are
  fork-aware: they register ``pthread_atfork`` handlers. ``ping`` reports the threads that exist.
- Everything that sizes a thread pool or shapes interpreter start-up (``*_NUM_THREADS``,
  ``PYTHON*``, ``LD_*``, locale, ...) is part of the server's key (see ``protocol``): the server
  starts with the request's values, so a child's thread settings equal a fresh process's.

Isolation: each child forks from the clean parent, calls ``setsid()`` (its own process group, so a
kill reaches everything it spawned), gets the caller's pipe as fds 1 and 2 and /dev/null as fd 0,
changes to the request's cwd, replaces ``os.environ`` by exactly the request env, reseeds the
global RNGs a fresh process would seed from the OS, and runs ``-m module`` through ``runpy`` as
``python -m`` does. Whatever it changes (env, modules, cwd, signal handlers, a crash) dies with it.
"""

from __future__ import annotations

import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_tasks.warm import protocol

#: Imported once by the server so that no step pays for them.
DEFAULT_PRELOAD = (
    "numpy", "torch", "torch._dynamo", "safetensors.torch", "minio", "flwr.app", "flwr.clientapp", "mlflow",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store", "matplotlib.pyplot",
    "fl_tasks.__main__", "fl_tasks.bridge", "fl_tasks.lineage", "fl_tasks.report", "fl_tasks.weights",
    "fl_tasks.steps.distribute", "fl_tasks.steps.train", "fl_tasks.steps.validate",
    "fl_tasks.steps.aggregate", "fl_tasks.steps.evaluate", "fl_tasks.steps.register",
    "fl_tasks.steps.distribute_region", "fl_tasks.steps.aggregate_region", "fl_tasks.steps.aggregate_regions",
    "fl_tasks.steps.publish_region", "fl_tasks.steps.collect_region", "fl_tasks.steps.promote",
)
_FORWARDED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} warm[{os.getpid()}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class StepRequest:
    """What a forked child runs: ``argv`` is ``[python, "-m", module, *args]``."""

    argv: list[str]
    env: dict[str, str]
    cwd: str


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    pid: int | None = None


@dataclass(eq=False)
class _Child:
    pid: int
    conn: _Conn | None
    kill_at: float | None = None


class _Forked(Exception):  # control flow, not an error
    """Raised in a freshly forked child to unwind the server loop and hand over the request."""

    def __init__(self, request: StepRequest):
        self.request = request


def preload(modules: tuple[str, ...]) -> list[str]:
    """Import ``modules``; a failure is logged (the step will meet the same error when it imports).

    What they leave behind is then frozen out of the cyclic GC (``gc.freeze()``, as Python's gc
    docs advise before forking without exec): a step's collections walk its own objects, not the
    preloaded torch/flwr/MLflow heap, and do not dirty its shared pages (copy-on-write).
    """
    import gc
    import importlib

    gc.disable()  # no collections during the imports: they would only move survivors around
    loaded = []
    try:
        for name in modules:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except Exception as exc:  # noqa: BLE001 - reported, and re-raised in the step itself
                log(f"preload of {name} failed: {type(exc).__name__}: {exc}")
    finally:
        gc.collect()
        gc.freeze()
        gc.enable()
    return loaded


def _install_roots() -> tuple[str, ...]:
    return tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def code_fingerprint() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every imported source file outside the interpreter's installation.

    That is the project's own code (editable installs, examples): if it changes on disk the server
    is stale and hands over to a new one instead of running old code.
    """
    roots = _install_roots()
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or os.path.realpath(path).startswith(roots):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamps[path] = (st.st_mtime_ns, st.st_size)
    return stamps


def _changed(stamps: dict[str, tuple[int, int]]) -> str | None:
    for path, stamp in stamps.items():
        try:
            st = os.stat(path)
        except OSError:
            return path
        if (st.st_mtime_ns, st.st_size) != stamp:
            return path
    return None


def os_threads() -> list[str]:
    """Names of this process's OS threads (Linux)."""
    names = []
    try:
        for tid in sorted(os.listdir("/proc/self/task")):
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
    except OSError:
        pass
    return names


class WarmServer:
    """Accepts step requests on a Unix socket and forks one child per step.

    socket_path: where to listen (its directory must be private to this user).
    idle_timeout: seconds without connections or running steps after which the server exits.
    disconnect_grace: seconds between SIGTERM and SIGKILL when a client disconnects mid-step.
    preloaded: module names imported before serving (reported by ``ping``).
    """

    def __init__(
        self, socket_path: Path, *, idle_timeout: float = 600.0, disconnect_grace: float = 5.0,
        preloaded: list[str] | None = None,
    ):
        self.path = Path(socket_path)
        self.idle_timeout = idle_timeout
        self.disconnect_grace = disconnect_grace
        self.preloaded = preloaded or []
        self.pid = os.getpid()
        self.started = time.time()
        self.requests = 0
        self.stamps = code_fingerprint()
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.inode: int | None = None
        self.conns: dict[int, _Conn] = {}
        self.children: dict[int, _Child] = {}
        self.last_activity = time.monotonic()
        self.terminate = False
        self.wake_r, self.wake_w = socket.socketpair()

    # ---- set-up and tear-down (parent only) ----

    def bind(self) -> None:
        """Listen on the socket path (raises if a live server already holds it)."""
        protocol.private_dir(self.path.parent)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(self.path))
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener
        self.inode = os.stat(self.path).st_ino
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._drain_wakeup)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler must exist for the wakeup byte
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(signal.SIGINT, self._on_terminate)

    def _on_terminate(self, _signum: int, _frame: Any) -> None:
        self.terminate = True

    def _stop_listening(self, why: str) -> None:
        if self.listener is None:
            return
        log(f"stop listening: {why}")
        try:
            if os.stat(self.path).st_ino == self.inode:  # never remove a successor's socket
                os.unlink(self.path)
        except OSError:
            pass
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None

    def _close_all(self) -> None:
        self._stop_listening("exit")
        for conn in list(self.conns.values()):
            self._drop(conn)
        signal.set_wakeup_fd(-1)
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()

    # ---- the loop ----

    def serve(self) -> StepRequest | None:
        """Run until idle/stopped (returns None), or, in a forked child, return its request."""
        try:
            while self.listener is not None or self.children:
                if self.terminate and self.listener is not None:
                    self._stop_listening("terminated")
                    for child in self.children.values():
                        self._kill(child, self.disconnect_grace)
                if self.listener is not None and not self.conns and not self.children:
                    if time.monotonic() - self.last_activity >= self.idle_timeout:
                        self._stop_listening(f"idle for {self.idle_timeout:g}s")
                        break
                for key, _events in self.sel.select(self._timeout()):
                    key.data(key.fileobj)
                self._reap()
                self._escalate()
        except _Forked as forked:
            return forked.request
        finally:
            if os.getpid() == self.pid:
                self._close_all()
        log(f"exiting after {self.requests} steps")
        return None

    def _timeout(self) -> float:
        deadlines = [c.kill_at for c in self.children.values() if c.kill_at is not None]
        if self.listener is not None and not self.conns and not self.children:
            deadlines.append(self.last_activity + self.idle_timeout)
        timeout = min(deadlines, default=time.monotonic() + 5.0) - time.monotonic()
        return max(0.0, min(timeout, 5.0))

    def _drain_wakeup(self, sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, lambda _s, c=conn: self._readable(c))
            self.last_activity = time.monotonic()

    def _readable(self, conn: _Conn) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(conn.sock, 65536, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, flags = b"", [], 0
        conn.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self._refuse(conn, "too many file descriptors")
            return
        if not data:
            self._disconnected(conn)
            return
        conn.buffer += data
        try:
            frames = protocol.split_frames(conn.buffer)
        except ValueError as exc:
            self._refuse(conn, str(exc))
            return
        for frame in frames:
            if conn.sock.fileno() < 0:
                return
            self._frame(conn, frame)

    def _frame(self, conn: _Conn, frame: dict[str, Any]) -> None:
        if conn.pid is not None:  # the step is running: the only message is a kill
            if "kill" in frame:
                self._kill(self.children[conn.pid], float(frame["kill"]))
            return
        op = frame.get("op")
        if op == "run":
            self._run(conn, frame)
        elif op == "ping":
            self._reply(conn, self.status())
        elif op == "stop":
            self._reply(conn, {"stopping": True})
            self._stop_listening("stop requested")
        else:
            self._refuse(conn, f"unknown op {op!r}")

    def status(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "python": sys.executable, "socket": os.fspath(self.path),
            "python_threads": threading.active_count(), "os_threads": os_threads(),
            "children": sorted(self.children), "preloaded": self.preloaded, "requests": self.requests,
            "uptime": round(time.time() - self.started, 3), "idle_timeout": self.idle_timeout,
        }

    # ---- running a step ----

    def _run(self, conn: _Conn, frame: dict[str, Any]) -> None:
        argv, env, cwd = frame.get("argv"), frame.get("env"), frame.get("cwd")
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and argv[1:2] == ["-m"]
                and len(argv) >= 3):
            self._refuse(conn, "argv must be [python, '-m', module, ...]")
            return
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            self._refuse(conn, "env must map strings to strings")
            return
        if not (isinstance(cwd, str) and os.path.isdir(cwd)):
            self._refuse(conn, f"cwd {cwd!r} is not a directory")
            return
        if len(conn.fds) != 2:
            self._refuse(conn, f"expected 2 file descriptors (stdout, stderr), got {len(conn.fds)}")
            return
        changed = _changed(self.stamps)
        if changed:
            self._refuse(conn, f"server code changed on disk ({changed}); start a new server", retry=True)
            self._stop_listening(f"stale: {changed} changed")
            return
        if self.listener is None:
            self._refuse(conn, "server is shutting down", retry=True)
            return
        self._fork(conn, StepRequest(argv, env, cwd))

    def _fork(self, conn: _Conn, request: StepRequest) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED_SIGNALS)
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                self._become_child(conn)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            except BaseException:  # noqa: BLE001 - whatever it is, the child must not return into the server
                os._exit(70)  # EX_SOFTWARE: could not even set up the child
            raise _Forked(request)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.requests += 1
        for fd in conn.fds:
            os.close(fd)
        conn.fds.clear()
        conn.pid = pid
        self.children[pid] = _Child(pid, conn)
        if not self._send(conn, {"pid": pid}):
            self._disconnected(conn)

    def _become_child(self, conn: _Conn) -> None:
        """In the child, before anything else: drop every server resource, wire up stdio."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        out, err = conn.fds
        self.sel.close()
        for sock in (self.listener, self.wake_r, self.wake_w):
            if sock is not None:
                sock.close()
        for other in self.conns.values():
            other.sock.close()
            for fd in other.fds:
                if other is not conn:
                    os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in {devnull, out, err} - {0, 1, 2}:
            os.close(fd)

    def _signal_group(self, pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            try:
                os.kill(pid, sig)  # not yet its own group leader (it blocks signals until it is)
            except ProcessLookupError:
                pass

    def _kill(self, child: _Child, grace: float) -> None:
        if child.kill_at is None:
            log(f"killing step {child.pid} (SIGTERM, SIGKILL after {grace:g}s)")
            self._signal_group(child.pid, signal.SIGTERM)
            child.kill_at = time.monotonic() + max(0.0, grace)

    def _escalate(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.kill_at is not None and child.kill_at <= now:
                self._signal_group(child.pid, signal.SIGKILL)
                child.kill_at = float("inf")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            self.last_activity = time.monotonic()
            if child is not None and child.conn is not None:
                self._send(child.conn, {"exit": os.waitstatus_to_exitcode(status)})
                self._drop(child.conn)

    def _disconnected(self, conn: _Conn) -> None:
        if conn.pid is not None and conn.pid in self.children:
            child = self.children[conn.pid]
            child.conn = None
            self._kill(child, self.disconnect_grace)
        self._drop(conn)

    # ---- connection helpers ----

    def _send(self, conn: _Conn, message: dict[str, Any]) -> bool:
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(5.0)
            protocol.send(conn.sock, message)
            conn.sock.setblocking(False)
            return True
        except OSError:
            return False

    def _reply(self, conn: _Conn, message: dict[str, Any]) -> None:
        self._send(conn, message)
        self._drop(conn)

    def _refuse(self, conn: _Conn, error: str, retry: bool = False) -> None:
        log(f"refused: {error}")
        self._reply(conn, {"error": error, "retry": retry})

    def _drop(self, conn: _Conn) -> None:
        for fd in conn.fds:
            os.close(fd)
        conn.fds.clear()
        if conn.sock.fileno() >= 0:
            self.conns.pop(conn.sock.fileno(), None)
            self.sel.unregister(conn.sock)
            conn.sock.close()
        self.last_activity = time.monotonic()


def run_step(request: StepRequest) -> str | int | None:
    """In the forked child: run ``python -m module args`` as a fresh interpreter would.

    Returns what the interpreter would exit with (a ``SystemExit`` code: None, an int or a
    message); the caller passes it to ``sys.exit`` so that normal interpreter shutdown (non-daemon
    threads joined, atexit handlers, stdio flushed) happens exactly as after ``python -m``.
    """
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    module = request.argv[2]
    sys.argv = [request.argv[0], *request.argv[3:]]  # runpy puts the module's path in argv[0]
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
    _reseed()
    # a fresh interpreter has the module only as __main__: the preloaded copy under its own name would
    # make runpy warn ("found in sys.modules after import of package") in every step's log
    if not hasattr(sys.modules.get(module), "__path__"):  # a package stays: runpy runs its __main__
        sys.modules.pop(module, None)
    sys.modules.pop(f"{module}.__main__", None)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # like CPython: die by SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        return 1
    except BaseException as exc:  # noqa: BLE001 - reported as the interpreter would, then exit 1
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # without run_step's own frame
        return 1
    return 0


def _reseed() -> None:
    """Global RNGs a fresh process seeds from the OS (``random`` reseeds itself at fork)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
