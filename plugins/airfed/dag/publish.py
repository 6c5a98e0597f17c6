"""Publish every job spec of a folder as an Airflow DAG (what the tiny dags/ loader file calls).

A broken spec never hides the others: valid specs are built, and the problems of the broken ones
surface as an Airflow import error (Airflow records the exception raised by a DAG's ``validate()``
against the loader file and keeps bagging the other DAGs of that file), each problem as
``file:line: field.path: message``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from airfed.dag.builder import START_DATE, build_dag
from airfed.spec import Problem, SpecError, find_specs, load_spec

#: env override: os.pathsep-separated spec files to load instead of the folder's (``airfed run``).
SPECS_ENV = "AIRFED_SPECS"
ERROR_DAG_ID = "airfed_invalid_specs"


class InvalidJobSpecs(Exception):
    """One or more job specs in the DAG folder are invalid (the message lists every problem)."""


class InvalidSpecsReport(DAG):
    """Carries spec problems into Airflow's import errors; it is never bagged or scheduled."""

    def validate(self) -> None:  # Airflow calls this before bagging
        raise InvalidJobSpecs(self.description)


def spec_paths(folder: str | Path | None) -> list[Path]:
    override = os.environ.get(SPECS_ENV)
    if override:
        return [Path(p) for p in override.split(os.pathsep) if p]
    return find_specs(folder) if folder else []


def build_all(paths: list[Path]) -> tuple[dict[str, DAG], list[Problem]]:
    dags: dict[str, DAG] = {}
    origin: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in paths:
        try:
            spec = load_spec(path)
            if spec.job in dags:
                message = f"job {spec.job!r} is already defined by {origin[spec.job]}"
                problems.append(Problem(str(path), None, "job", message))
                continue
            dags[spec.job] = build_dag(spec, path)
            origin[spec.job] = path
            if spec.promotion.approval == "required":
                from airfed.dag.approval import build_approval_dag

                approval = build_approval_dag(spec)
                if approval.dag_id in dags:
                    raise ValueError(f"the approval DAG id {approval.dag_id!r} is already taken by a job")
                dags[approval.dag_id] = approval
                origin[approval.dag_id] = path
        except SpecError as exc:
            problems.extend(exc.problems)
        except Exception as exc:  # noqa: BLE001 - a builder bug in one spec must not hide the others either
            problems.append(Problem(str(path), None, "<dag>", f"{type(exc).__name__}: {exc}"))
    return dags, problems


def publish_dags(namespace: dict[str, Any], folder: str | Path | None = None) -> dict[str, DAG]:
    """Build the DAG of every spec and put them into ``namespace`` (the loader module's globals)."""
    dags, problems = build_all(spec_paths(folder))
    for dag_id, dag in dags.items():
        namespace[f"dag__{dag_id}"] = dag
    if problems:
        message = f"{len(problems)} problem(s) in airfed job specs:\n" + "\n".join(str(p) for p in problems)
        namespace["dag__airfed_invalid_specs"] = InvalidSpecsReport(
            dag_id=ERROR_DAG_ID, description=message, schedule=None, start_date=START_DATE
        )
    return dags
