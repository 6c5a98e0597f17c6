"""``python -m fl_tasks.warm serve --socket PATH`` (the warm step server), ``ping``, ``stop``.

The launcher starts ``serve --daemon`` itself; ``ping`` and ``stop`` are for people and tests.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import sys

from fl_tasks.warm import protocol


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fl_tasks.warm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="import the step side once and fork one child per step")
    serve.add_argument("--socket", required=True)
    serve.add_argument("--idle-timeout", type=float, default=600.0, help="seconds idle before exiting")
    serve.add_argument("--preload", default="", help="comma-separated extra modules to import up front")
    serve.add_argument("--no-default-preload", action="store_true", help="import only --preload")
    serve.add_argument("--ready-fd", type=int, default=None, help="write 'ok' here once listening")
    serve.add_argument("--daemon", action="store_true", help="detach (double fork, new session)")
    for name in ("ping", "stop"):
        sub.add_parser(name).add_argument("--socket", required=True)
    return parser


#: Set in a forked child once its step has finished: the status the process exits with.
_child_exit: dict[str, int] = {}


def _exit_child_without_teardown() -> None:
    """Registered before any other exit handler, so it runs last (atexit is LIFO).

    In a forked child, interpreter shutdown has by now joined non-daemon threads and run every
    other atexit handler, as after ``python -m``; what remains is tearing down the modules the
    server imported, which costs seconds (and copies every page the parent shares with the
    child) without changing anything a step can observe. Flush stdio and leave.
    """
    if "status" in _child_exit:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(_child_exit["status"])


def _status(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives (the interpreter prints a non-int code itself)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1


def _ready(fd: int | None, message: str) -> None:
    if fd is not None:
        try:
            os.write(fd, message.encode() + b"\n")
        finally:
            os.close(fd)


def serve(ns: argparse.Namespace) -> str | int | None:
    atexit.register(_exit_child_without_teardown)
    if ns.daemon:
        if os.fork():
            os._exit(0)  # the launcher reaps this intermediate at once; the server is re-parented
        os.setsid()
    from fl_tasks.warm.server import DEFAULT_PRELOAD, WarmServer, log, preload, run_step

    extra = tuple(m for m in ns.preload.split(",") if m)
    loaded = preload((() if ns.no_default_preload else DEFAULT_PRELOAD) + extra)
    server = WarmServer(ns.socket, idle_timeout=ns.idle_timeout, preloaded=loaded)
    try:
        server.bind()
    except OSError as exc:
        _ready(ns.ready_fd, f"error: cannot listen on {ns.socket}: {exc}")
        return 1
    log(f"serving on {ns.socket} ({sys.executable}; {len(loaded)} modules preloaded)")
    _ready(ns.ready_fd, "ok")
    request = server.serve()
    if request is None:
        return 0
    code = run_step(request)  # a forked child: exit as `python -m module` would
    _child_exit["status"] = _status(code)
    return code


def _ask(path: str, op: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        print(f"no warm server on {path}: {exc}", file=sys.stderr)
        return 1
    with sock:
        protocol.send(sock, {"op": op})
        print(json.dumps(protocol.FrameReader(sock).read(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> str | int | None:
    ns = _parser().parse_args(argv)
    if ns.command == "serve":
        return serve(ns)
    return _ask(ns.socket, ns.command)


if __name__ == "__main__":
    sys.exit(main())
