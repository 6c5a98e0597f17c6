"""The last task of a round: trigger the job's next round as a new run of the same DAG.

A run whose ``rounds`` param is N > 1 triggers the next run with ``rounds = N - 1``, the same
``training`` and the chain's id (the first run's id; the MLflow parent run of the chain); with
N = 1 it skips. It runs only when ``register`` succeeded, i.e. the round committed: a failed round
fails its run and ends the chain. ``max_active_runs=1`` queues the new run until this one finishes.

The next run's id is derived from the chain (``<chain id>__rounds_left_<N-1>``): a retry of this
task finds the run it already triggered and skips instead of adding a second one. It inherits this
run's ``run_after`` (the chain's first), and the scheduler starts queued runs in ``run_after`` order:
a chain keeps its place in the queue, so two chains (a schedule and a manual trigger) do not
interleave their rounds.

Under ``dag.test()`` the trigger would create a queued run in the metadata DB that nothing runs,
so ``airfed run`` asks every run for ``rounds=1`` and chains the runs itself.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk.exceptions import AirflowSkipException

#: dag_run.conf keys of a chained run (besides the params ``rounds`` and ``training``).
CHAIN_ID_KEY = "chain_id"


def chain_id(context: Any) -> str:
    """The first run of this chain of rounds (this run, unless it was triggered by a previous round)."""
    conf = getattr(context["dag_run"], "conf", None) or {}
    return str(conf.get(CHAIN_ID_KEY) or context["run_id"])


def next_round_conf(context: Any) -> dict[str, Any]:
    """The conf of the next run in the chain: one fewer round, the same training and chain id."""
    params = context["params"]
    return {
        "rounds": int(params["rounds"]) - 1,
        "training": dict(params["training"]),
        CHAIN_ID_KEY: chain_id(context),
    }


def next_run_id(conf: dict[str, Any]) -> str:
    return f"{conf[CHAIN_ID_KEY]}__rounds_left_{conf['rounds']}"


class NextRoundOperator(TriggerDagRunOperator):
    """Trigger the next round of the chain (``rounds - 1``), or skip after the last one."""

    ui_color = "#f4eee4"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("skip_when_already_exists", True)
        kwargs.setdefault("openlineage_inject_parent_info", False)  # the conf is the chain's, nothing else
        super().__init__(**kwargs)

    def execute(self, context: Any) -> Any:
        rounds = int(context["params"]["rounds"])
        if rounds <= 1:
            raise AirflowSkipException("the last round this run asked for: nothing to chain")
        self.conf = next_round_conf(context)
        self.trigger_run_id = next_run_id(self.conf)
        self.run_after = context["dag_run"].run_after
        self.log.info("Chaining the next round (%d left): run %s", rounds - 1, self.trigger_run_id)
        return super().execute(context)
