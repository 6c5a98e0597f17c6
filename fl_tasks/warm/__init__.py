"""Warm step execution: run ``python -m fl_tasks <step> ...`` without paying interpreter start-up.

``launcher_from_env()`` returns the launcher ``AIRFED_STEP_LAUNCHER`` selects: ``WarmLauncher`` (a
long-lived server that has imported torch/flwr/mlflow and the step modules forks one isolated child
per step) or ``SubprocessLauncher`` (a fresh interpreter per step). Both keep the same contract:
argv + env, exit codes, streamed output, kill of the step's process group.

Stdlib only, and lazy: importing this package imports nothing (the server's ``__main__`` relies on
that to register its exit hook before any other module registers one).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "IDLE_TIMEOUT_ENV", "LAUNCHER_ENV", "PRELOAD_ENV", "PYTHON_ENV", "RUN_DIR_ENV", "LaunchError", "Launcher",
    "RunningStep", "SubprocessLauncher", "WarmLauncher", "WarmUnavailable", "launcher_from_env", "run",
    "step_command", "step_python", "stop_servers",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fl_tasks.warm import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'fl_tasks.warm' has no attribute {name!r}")
