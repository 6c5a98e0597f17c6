"""The local runner: each step runs its StepCall's argv and env as a subprocess on the worker.

The subprocess's output is streamed line by line into the Airflow task log; a non-zero exit fails
the task. The step's JSON result (written to ``AIRFED_RESULT_FILE``) becomes the task's XCom.

The StepCall's ``python`` is the interpreter Airflow runs in, unless ``AIRFED_STEP_PYTHON`` names
another command (e.g. the fl-task image's environment: ``make rehearse`` runs every step there).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from airfed.ui.links import step_links
from fl_tasks.contract import RESULT_FILE_ENV, SKIP_EXIT_CODE, StepCall

#: The interpreter (or command prefix, shell-split) that runs ``python -m fl_tasks ...`` locally;
#: default: the interpreter Airflow runs in. A rehearsal of the deployed form points it at the
#: step environment's interpreter (the stand-in for the fl-task image).
STEP_PYTHON_ENV = "AIRFED_STEP_PYTHON"


def step_command(argv: list[str]) -> list[str]:
    """A StepCall's argv as the local runner executes it: its ``python`` is the step interpreter."""
    if argv[:1] != ["python"]:
        return list(argv)
    prefix = shlex.split(os.environ.get(STEP_PYTHON_ENV, "")) or [sys.executable]
    return [*prefix, *argv[1:]]


class LocalStepOperator(BaseOperator):
    """Run ``python -m fl_tasks <step> ...`` as a subprocess with the StepCall's env."""

    template_fields = ("argv",)
    ui_color = "#e8f4ea"
    operator_extra_links = step_links()  # MLflow round run + registered model version

    def __init__(self, *, step: str, argv: list[str], env: dict[str, str], silo: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.step = step
        self.argv = argv
        self.env = env
        self.silo = silo
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="airfed-step-") as tmp:
            result_file = Path(tmp) / "result.json"
            env = {**os.environ, **self.env, RESULT_FILE_ENV: str(result_file)}
            command = step_command(self.argv)
            self.log.info("Running %s", " ".join(command))
            tail: deque[str] = deque(maxlen=20)
            self._proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                start_new_session=True,
            )
            try:
                assert self._proc.stdout is not None
                for line in self._proc.stdout:
                    line = line.rstrip("\n")
                    tail.append(line)
                    self.log.info("%s", line)
                code = self._proc.wait()
            finally:
                self._kill()
            if code == SKIP_EXIT_CODE:
                raise AirflowSkipException(tail[-1] if tail else f"step {self.step} had nothing to do")
            if code != 0:
                raise AirflowException(
                    f"step {self.step}{f' (silo {self.silo})' if self.silo else ''} exited with code {code}; "
                    f"last output:\n" + "\n".join(tail)
                )
            return json.loads(result_file.read_text()) if result_file.exists() else None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)

    def on_kill(self) -> None:
        self._kill()


def local_task(step: str, call: StepCall | list[StepCall], options: dict[str, Any]) -> Any:
    """A server step as one task; a per-silo step as one task mapped over the silos."""
    if isinstance(call, StepCall):
        return LocalStepOperator(step=step, argv=call.argv, env=call.env, **options)
    return LocalStepOperator.partial(
        step=step, map_index_template="{{ task.silo }}", **options
    ).expand_kwargs([c.as_kwargs() for c in call])
