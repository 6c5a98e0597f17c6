"""Round slots beyond a run's ``rounds`` param: every step task of such a slot skips itself.

A DAG unrolls ``max_rounds_per_run`` round slots; a run asking for fewer rounds (the trigger form,
``POST /api/v2/dags/<job>/dagRuns`` with ``conf.rounds``, or the schedule's default) must leave the
extra slots skipped. The slot's gate (a ShortCircuitOperator) skips what follows it, but Airflow 3
skips only map index -1 of a mapped task, while the per-silo tasks are expanded when the run is
created: a per-silo step that runs whatever its upstream did (validate, trigger rule ``all_done``)
would still start, and fail rendering a round number its slot never got. So the step operators
check the slot themselves before rendering their templates (mapped or not) and skip.
"""

from __future__ import annotations

import re
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

SLOT_RE = re.compile(r"^round_(\d+)\.")


def slot_of(task_id: str) -> int | None:
    """``round_3.train`` → 3; None for a task outside the round slots."""
    match = SLOT_RE.match(task_id)
    return int(match.group(1)) if match else None


def skip_inactive_slot(task_id: str, context: Any) -> None:
    """Raise AirflowSkipException when ``task_id``'s round slot is beyond the run's ``rounds`` param."""
    slot = slot_of(task_id)
    wanted = (context.get("params") or {}).get("rounds")
    if slot is None or wanted is None:
        return
    if slot > int(wanted):
        raise AirflowSkipException(f"round slot {slot} is not part of this run (it asked for {wanted} rounds)")


class RoundSlotGuard:
    """Mixin for the step operators: skip, before any template is rendered, in an inactive slot."""

    def _do_render_template_fields(self, parent: Any, template_fields: Any, context: Any, jinja_env: Any,
                                   seen_oids: set[int]) -> None:
        # Called on the (unmapped) task itself for mapped and plain tasks alike, then recursively
        # for nested template fields (other parents).
        if parent is self:
            skip_inactive_slot(self.task_id, context)  # type: ignore[attr-defined]
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)  # type: ignore[misc]
