"""The local runner: each step runs its StepCall's argv and env on the worker, warm or cold.

``fl_tasks.warm.launcher_from_env()`` picks how (``AIRFED_STEP_LAUNCHER``): ``warm`` (default) asks
a long-lived server that has imported the step side once to fork the step; ``subprocess`` starts a
fresh interpreter. Either way the contract is the same: the argv's ``python`` is the step interpreter
(``AIRFED_STEP_PYTHON``), the env is exactly the worker's env plus the StepCall's, output is
streamed line by line into the Airflow task log, exit code 99 skips the task and any other
non-zero code fails it, the step's JSON result (written to ``AIRFED_RESULT_FILE``) becomes the
task's XCom, and ``on_kill`` (or a timeout) kills the step's whole process group.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from airfed.ui.links import step_links
from fl_tasks.contract import REGION_STEPS, RESULT_FILE_ENV, SKIP_EXIT_CODE, StepCall
from fl_tasks.warm import RunningStep, launcher_from_env, step_command


class LocalStepOperator(BaseOperator):
    """Run ``python -m fl_tasks <step> ...`` on the worker (warm or as a subprocess) with the StepCall's env."""

    template_fields = ("argv",)
    ui_color = "#e8f4ea"
    operator_extra_links = step_links()  # MLflow round run + registered model version

    def __init__(self, *, step: str, argv: list[str], env: dict[str, str], silo: str | None = None,
                 region: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.region = region
        self.step = step
        self.argv = argv
        self.env = env
        self.silo = silo
        self._running: RunningStep | None = None

    def execute(self, context: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="airfed-step-") as tmp:
            result_file = Path(tmp) / "result.json"
            env = {**os.environ, **self.env, RESULT_FILE_ENV: str(result_file)}
            launcher = launcher_from_env(env)
            self.log.info("Running %s (%s)", shlex.join(step_command(self.argv, launcher.python)), launcher.kind)
            tail: deque[str] = deque(maxlen=20)
            with launcher.start(self.argv, env) as step:  # leaving early kills the step's process group
                self._running = step
                try:
                    for line in step.lines():
                        tail.append(line)
                        self.log.info("%s", line)
                    code = step.wait()
                finally:
                    self._running = None
            if code == SKIP_EXIT_CODE:
                raise AirflowSkipException(tail[-1] if tail else f"step {self.step} had nothing to do")
            if code != 0:
                raise AirflowException(
                    f"step {self.step}{f' (silo {self.silo})' if self.silo else ''} exited with code {code}; "
                    f"last output:\n" + "\n".join(tail)
                )
            return json.loads(result_file.read_text()) if result_file.exists() else None

    def on_kill(self) -> None:
        step = self._running
        if step is not None:
            step.kill()


def local_task(step: str, call: StepCall | list[StepCall], options: dict[str, Any]) -> Any:
    """A server step as one task; a per-silo step as one task mapped over the silos."""
    if isinstance(call, StepCall):
        return LocalStepOperator(step=step, argv=call.argv, env=call.env, **options)
    label = "{{ task.region }}" if step in REGION_STEPS else "{{ task.silo }}"
    return LocalStepOperator.partial(
        step=step, map_index_template=label, **options
    ).expand_kwargs([c.as_kwargs() for c in call])
