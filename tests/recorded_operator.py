"""A local runner operator whose task log is a list: tests read what the runner wrote, line by line."""

from __future__ import annotations

from airfed.runners.local import LocalStepOperator


class TaskLog:
    """Stands in for the task's logger: what the runner writes to the task log, message by message."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, message: str, *args: object) -> None:
        self.messages.append(message % args if args else message)

    def warning(self, *_args: object, **_kwargs: object) -> None:
        """Not the step's output (e.g. "execute cannot be called outside of the Task Runner")."""

    error = debug = exception = warning


class RecordedStepOperator(LocalStepOperator):
    @property
    def log(self) -> TaskLog:  # type: ignore[override]
        return self.__dict__.setdefault("_task_log", TaskLog())
