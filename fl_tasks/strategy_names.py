"""Aggregation strategies a job spec may name, with the parameters each accepts (Flower's names).

Pure data: the spec validator on the Airflow side imports it at DAG-parse time, and the aggregate
step uses it to check it was given a strategy it implements.
"""

from __future__ import annotations

#: strategy name -> {parameter name: (type, default)}
STRATEGY_PARAMS: dict[str, dict[str, tuple[type, object]]] = {
    "FedAvg": {},
    # FedProx aggregates like FedAvg; the proximal term is applied by the client, which receives
    # ``proximal_mu`` in its train config.
    "FedProx": {"proximal_mu": (float, 0.0)},
}


def strategy_param_defaults(name: str) -> dict[str, object]:
    return {key: default for key, (_type, default) in STRATEGY_PARAMS[name].items()}
