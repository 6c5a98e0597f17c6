"""Runners turn StepCalls into Airflow operators: ``local`` (subprocess) or ``kubernetes`` (pods)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fl_tasks.contract import StepCall
from fl_tasks.spec import JobSpec

#: (step name, its StepCall or per-silo StepCalls, Airflow task options incl. task_id) -> the step's task
OperatorFactory = Callable[[str, StepCall | list[StepCall], dict[str, Any]], Any]


def operator_factory(spec: JobSpec) -> OperatorFactory:
    """The function that makes the task for one step of a round, for the spec's runner."""
    if spec.runner == "local":
        from airfed.runners.local import local_task

        return local_task
    if spec.runner == "kubernetes":
        from airfed.runners.kubernetes import kubernetes_tasks

        return kubernetes_tasks(spec)
    raise NotImplementedError(f"runner {spec.runner!r} is not available yet")
