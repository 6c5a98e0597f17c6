"""A step-like program for the launcher tests: ``python -m airfed_step_helper <behaviour> [args]``.

Each behaviour is one thing a real step can do (succeed with output and a result file, exit 99,
raise, crash, hang, time itself out, leak state); the same argv runs cold and warm.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import time

import fl_tasks.contract as contract


def ok(lines: str = "3") -> None:
    for i in range(int(lines)):
        print(f"line {i}", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    result = {"pid": os.getpid(), "argv": sys.argv[1:], "name": __name__, "cwd": os.getcwd()}
    with open(os.environ[contract.RESULT_FILE_ENV], "w") as fh:
        json.dump(result, fh)
    print("no newline at the end", end="")


def hang() -> None:
    child = subprocess.Popen(["sleep", "1000"])  # a grandchild: the kill must reach it too
    print(f"grandchild {child.pid}", flush=True)
    if os.environ.get("HELPER_PID_FILE"):
        with open(os.environ["HELPER_PID_FILE"], "w") as fh:
            fh.write(f"{os.getpid()} {child.pid}")
    time.sleep(1000)


def ignore_term() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
    time.sleep(1000)


def alarm(seconds: str = "1") -> None:
    def expire(_signum, _frame):
        raise TimeoutError(f"timed out after {seconds}s")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(seconds))
    print("waiting for the alarm", flush=True)
    time.sleep(30)


def leak() -> None:
    os.environ["AIRFED_LEAKED"] = "yes"
    contract.SKIP_EXIT_CODE = 42
    sys.modules["airfed_leaked_module"] = type(sys)("airfed_leaked_module")
    sys.path.append("/leaked/path")
    os.chdir("/")
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    print("leaked", flush=True)


def probe() -> None:
    import numpy

    state = {
        "leaked_env": os.environ.get("AIRFED_LEAKED"),
        "skip_code": contract.SKIP_EXIT_CODE,
        "leaked_module": "airfed_leaked_module" in sys.modules,
        "leaked_path": "/leaked/path" in sys.path,
        "cwd": os.getcwd(),
        "sigusr1_default": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
        "name": __name__,
        "env_keys": sorted(os.environ),
        "random": random.random(),
        "numpy_random": float(numpy.random.random()),
        "utf8_mode": sys.flags.utf8_mode,
    }
    print(json.dumps(state), flush=True)


def threads() -> None:
    import torch

    print(json.dumps({"torch_threads": torch.get_num_threads()}), flush=True)


def shutdown() -> None:
    """Interpreter shutdown as after `python -m`: non-daemon threads joined, then atexit handlers."""
    import atexit
    import threading

    atexit.register(lambda: print("atexit handler ran", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished", flush=True))).start()
    print("main finished", flush=True)


def sleep(seconds: str = "1") -> None:
    start = time.time()
    time.sleep(float(seconds))
    print(json.dumps({"start": start, "end": time.time()}), flush=True)


def main(argv: list[str]) -> None:
    what, *args = argv
    if what == "exit":
        sys.exit(int(args[0]) if args[0].lstrip("-").isdigit() else args[0])
    if what == "raise":
        raise ValueError("boom from the step")
    if what == "os_exit":
        print("about to _exit", flush=True)
        os._exit(3)
    if what == "segfault":
        ctypes.string_at(0)
    globals()[what](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
