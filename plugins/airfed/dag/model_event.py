"""The job's model Asset event, with what a consumer needs in its ``extra``.

A step's result is its task's XCom, but a runner's operator (a subprocess or a pod) has no say in
the Asset event. So the event comes from this small Airflow-side task right after the step: it
reads the step's XCom and sets the outlet event's ``extra`` (``context["outlet_events"][asset]``,
Airflow's public API). Consumers scheduled on the Asset read round, version, metrics and whether
`champion` moved from their inlet events, with no MLflow client.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

#: Keys of a register (or promote) result that the event carries, as they are named there.
EXTRA_KEYS = ("job", "round", "dag_run_id", "registry_model", "registry_version", "champion_version",
              "promotion_metric", "promotion_value", "metrics", "accepted", "rejected", "awaiting_approval",
              "mlflow_experiment_id", "mlflow_run_id", "global")


def event_extra(result: dict[str, Any]) -> dict[str, Any]:
    """The event's ``extra`` from a step result: its round facts, ``version`` and ``champion_moved``."""
    extra = {k: result[k] for k in EXTRA_KEYS if k in result}
    extra["version"] = result.get("registry_version")
    extra["champion_moved"] = bool(result["champion_moved"] if "champion_moved" in result else result.get("promoted"))
    return extra


class ModelEventOperator(BaseOperator):
    """Emit the model Asset event of ``source_task_id``'s result (``only_when_moved``: skip, and so
    emit nothing, unless that result moved `champion`)."""

    ui_color = "#eef0f8"

    def __init__(self, *, asset: Asset, source_task_id: str, only_when_moved: bool = False, **kwargs: Any):
        super().__init__(outlets=[asset], **kwargs)
        self.asset = asset
        self.source_task_id = source_task_id
        self.only_when_moved = only_when_moved

    def execute(self, context: Any) -> dict[str, Any]:
        result = context["ti"].xcom_pull(task_ids=self.source_task_id)
        if not isinstance(result, dict):
            raise AirflowException(f"{self.source_task_id} left no result to publish (XCom {result!r})")
        extra = event_extra(result)
        if self.only_when_moved and not extra["champion_moved"]:
            raise AirflowSkipException(f"v{extra['version']}: champion did not move, no model event")
        context["outlet_events"][self.asset].extra = extra
        self.log.info("model event of %s: %s", self.asset.name, extra)
        return extra
