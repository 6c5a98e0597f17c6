"""``airfed promote SPEC --version N`` and ``airfed rollback SPEC``: move `champion` by hand.

Argument parsing and printing only; the move is step-side code (:mod:`fl_tasks.promotion`, the
same the approval DAG's promote step uses), imported when a command runs: it needs the MLflow
client, which the Airflow image does not have. Who acted is ``AIRFED_USER``, else the login name.
Both refuse a version that is not one of the job's or whose artifact fails its sha256.

After the move, the job's model Asset event goes to Airflow's REST API when ``AIRFED_AIRFLOW_URL``
names it (:mod:`airfed.asset_events`), so consumers scheduled on the Asset run with the new champion.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def add_commands(subparsers: Any) -> None:
    """Register ``promote`` and ``rollback`` on the ``airfed`` command's subparsers."""
    promote = subparsers.add_parser(
        "promote", help="point the job's `champion` alias at a model version (recorded as tags)",
        description="Move the registry alias `champion` of the job's model to version N, after checking "
        "that N is a version of this job and that its artifact matches the sha256 recorded at registration. "
        "Recorded as tags on both versions (who, when, from -> to), as a run in the job's MLflow experiment, "
        "and in the store (champion.json).",
    )
    promote.add_argument("spec")
    promote.add_argument("--version", type=int, required=True, help="the model version to make champion")
    promote.add_argument("--reason", default="", help="why (recorded with the move)")
    promote.set_defaults(func=_cmd_promote)

    rollback = subparsers.add_parser(
        "rollback", help="return `champion` to the version that held it before the current one",
        description="Move `champion` back to the previous champion (the current champion's "
        "`champion.previous` tag), checked and recorded as `airfed promote` does.",
    )
    rollback.add_argument("spec")
    rollback.add_argument("--reason", default="", help="why (recorded with the move)")
    rollback.set_defaults(func=_cmd_rollback)


def _move(command: str, spec_path: str, version: int | None, reason: str) -> int:
    from airfed.spec import load_spec

    spec = load_spec(spec_path)
    try:
        from fl_tasks import lineage, promotion
        from fl_tasks.steps.common import scratch_dir
        from fl_tasks.store import open_store
    except ImportError as exc:
        print(f"airfed {command}: error: needs the step-side packages (the MLflow client; the fl-task image "
              f"has them), missing here: {exc.name or exc}", file=sys.stderr)
        return 2
    try:
        with lineage.reporting_failures(f"airfed {command} {spec.job}"), scratch_dir() as tmp:
            c = lineage.client()
            target = version if version is not None else promotion.rollback_target(c, spec.model_name)
            move = promotion.move_champion(
                c, open_store(), job=spec.job, model_name=spec.model_name, experiment=spec.experiment_name,
                version=target, action=command, by=promotion.who(), reason=reason, scratch=tmp,
            )
    except promotion.PromotionRefused as exc:
        print(f"airfed {command}: refused: {exc}", file=sys.stderr)
        return 1
    except lineage.LineageUnavailable as exc:
        print(f"airfed {command}: error: {exc}", file=sys.stderr)
        return 1
    print(move.describe(spec.model_name))
    return _emit_event(command, spec.job, lambda: promotion.event_extra(c, spec.job, spec.model_name, move))


def _emit_event(command: str, job: str, extra: Callable[[], dict]) -> int:
    """The move's model Asset event through Airflow's API, or a note saying why there is none."""
    from airfed import asset_events

    name = asset_events.model_asset_name(job)
    try:
        api = asset_events.AirflowApi.from_env()
        if api is None:
            print(f"note: no Asset event for {name} ({asset_events.URL_ENV} is not set): DAGs scheduled on it "
                  f"do not run for this move")
            return 0
        event = api.emit(name, extra())
    except asset_events.AirflowApiError as exc:
        print(f"airfed {command}: error: champion moved, but the Asset event for {name} failed: {exc}",
              file=sys.stderr)
        return 1
    print(f"asset event: {name} #{event.get('id')} on {api.url}")
    return 0


def _cmd_promote(ns: argparse.Namespace) -> int:
    return _move("promote", ns.spec, ns.version, ns.reason)


def _cmd_rollback(ns: argparse.Namespace) -> int:
    return _move("rollback", ns.spec, None, ns.reason)
