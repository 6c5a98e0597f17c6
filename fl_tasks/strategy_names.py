"""Aggregation strategies a job spec may name, with the parameters each accepts (Flower's names).

Names, parameter names and defaults are those of Flower's strategy classes in
``flwr.server.strategy`` (Flower 1.32). Two parameters are not used by the server's aggregation:
FedProx's ``proximal_mu`` (the distribute step puts it in the clients' train config) and the FedOpt
family's client learning rate ``eta_l`` (accepted for compatibility; Flower's strategies store it and
never use it either, clients take their learning rate from the train config).

Pure data: the spec validator on the Airflow side imports it at DAG-parse time, and the aggregate
step uses it to check it was given a strategy it implements.
"""

from __future__ import annotations

from collections.abc import Mapping

#: strategy name -> {parameter name: (type, default)}
STRATEGY_PARAMS: dict[str, dict[str, tuple[type, object]]] = {
    "FedAvg": {},
    # FedProx aggregates like FedAvg; the proximal term is applied by the client, which receives
    # ``proximal_mu`` in its train config.
    "FedProx": {"proximal_mu": (float, 0.0)},
    "FedAvgM": {"server_learning_rate": (float, 1.0), "server_momentum": (float, 0.0)},
    "FedAdagrad": {"eta": (float, 0.1), "eta_l": (float, 0.1), "tau": (float, 1e-9)},
    "FedAdam": {
        "eta": (float, 0.1),
        "eta_l": (float, 0.1),
        "beta_1": (float, 0.9),
        "beta_2": (float, 0.99),
        "tau": (float, 1e-9),
    },
    "FedYogi": {
        "eta": (float, 0.01),
        "eta_l": (float, 0.0316),
        "beta_1": (float, 0.9),
        "beta_2": (float, 0.99),
        "tau": (float, 1e-3),
    },
    "FedMedian": {},
    "FedTrimmedAvg": {"beta": (float, 0.2)},
    # num_clients_to_keep > 0 is MultiKrum (the mean of the kept updates), as in Flower
    "Krum": {"num_malicious_clients": (int, 0), "num_clients_to_keep": (int, 0)},
    # Flower's Bulyan with its default first rule, Krum; ``to_keep`` is passed on to Krum
    "Bulyan": {"num_malicious_clients": (int, 0), "to_keep": (int, 0)},
}

#: parameters that concern the clients, not the server's aggregation
CLIENT_PARAMS = frozenset({"proximal_mu", "eta_l"})


def strategy_param_defaults(name: str) -> dict[str, object]:
    return {key: default for key, (_type, default) in STRATEGY_PARAMS[name].items()}


def resolve_strategy_params(name: str, params: Mapping[str, object] | None = None) -> dict[str, object]:
    """Defaults overlaid with ``params``, type-checked; ValueError naming the problem otherwise."""
    if name not in STRATEGY_PARAMS:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGY_PARAMS)}")
    allowed = STRATEGY_PARAMS[name]
    resolved = strategy_param_defaults(name)
    for key, value in (params or {}).items():
        if key not in allowed:
            raise ValueError(f"unknown parameter {key!r} for {name}; accepted: {', '.join(allowed) or 'none'}")
        expected = allowed[key][0]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ValueError(f"parameter {key!r} of {name} must be {expected.__name__}, got {value!r}")
        resolved[key] = value
    return resolved


def parse_param(name: str, assignment: str) -> tuple[str, object]:
    """``key=value`` (command line) -> (key, value typed as the strategy's parameter)."""
    if name not in STRATEGY_PARAMS:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGY_PARAMS)}")
    key, sep, text = assignment.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key:
        raise ValueError(f"--param {assignment!r}: expected key=value")
    allowed = STRATEGY_PARAMS[name]
    if key not in allowed:
        raise ValueError(f"unknown parameter {key!r} for {name}; accepted: {', '.join(allowed) or 'none'}")
    expected = allowed[key][0]
    try:
        if expected is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return key, text.lower() in ("true", "1", "yes")
        return key, expected(text)
    except ValueError:
        raise ValueError(f"parameter {key!r} of {name} must be {expected.__name__}, got {text!r}") from None
