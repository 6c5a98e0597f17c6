"""The aggregation strategies a job spec may name: Flower's names and parameters (``flwr.serverapp.strategy``).

One module per strategy, as in Flower, each a pydantic model of the strategy's server-side
parameters documented once in its docstring; variants by inheritance (``Krum(MultiKrum)``).
Pure (pydantic only): the spec validator imports this at DAG-parse time and ``airfed validate``
checks parameter ranges here, as Flower's classes would at run time. The arithmetic lives in
:mod:`fl_tasks.aggregation` (NumPy), which dispatches on these models.

Names from Flower's legacy ``flwr.server.strategy`` API are still accepted, each with one
:class:`StrategyDeprecation` warning naming the current name (:func:`normalize`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fl_tasks.strategies.base import StrategyParams
from fl_tasks.strategies.bulyan import Bulyan
from fl_tasks.strategies.fedadagrad import FedAdagrad
from fl_tasks.strategies.fedadam import FedAdam
from fl_tasks.strategies.fedavg import FedAvg
from fl_tasks.strategies.fedavgm import FedAvgM
from fl_tasks.strategies.fedmedian import FedMedian
from fl_tasks.strategies.fedprox import FedProx
from fl_tasks.strategies.fedtrimmedavg import FedTrimmedAvg
from fl_tasks.strategies.fedyogi import FedYogi
from fl_tasks.strategies.krum import Krum
from fl_tasks.strategies.multikrum import MultiKrum

#: strategy name -> its parameter model
STRATEGIES: dict[str, type[StrategyParams]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum, MultiKrum,
                Bulyan)
}
#: defaults that changed with Flower's current names: a record written before (schema_version 1)
#: that omits them was computed with these
V1_DEFAULTS: dict[str, dict[str, float]] = {"FedAdam": {"tau": 1e-9}, "FedAdagrad": {"tau": 1e-9}}

__all__ = [
    "STRATEGIES", "Bulyan", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedMedian", "FedProx", "FedTrimmedAvg",
    "FedYogi", "Krum", "MultiKrum", "StrategyDeprecation", "StrategyParams", "ValidationError", "check_params",
    "describe_error", "normalize", "problem", "parse_param", "resolved_params",
]


class StrategyDeprecation(DeprecationWarning):
    """A legacy Flower strategy or parameter name was used; the message names the current one."""


def strategy_class(name: str) -> type[StrategyParams]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}") from None


def normalize(name: str, params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Map legacy names (Flower's ``flwr.server.strategy``) to current ones, warning once per name."""
    params = dict(params or {})
    if name == "Krum" and "num_clients_to_keep" in params:
        keep = params.pop("num_clients_to_keep")
        if keep not in (0, 1):
            _deprecated("Krum with num_clients_to_keep", "strategy MultiKrum with num_nodes_to_select")
            name = "MultiKrum"
            params["num_nodes_to_select"] = keep
        else:
            _deprecated("num_clients_to_keep", "nothing (Krum selects one update; MultiKrum takes num_nodes_to_select)")
    if name == "Bulyan" and "to_keep" in params:
        if params["to_keep"] != 0:
            raise ValueError(
                "Bulyan parameter 'to_keep' (legacy) must be 0: Flower's Bulyan selects n - 2f updates itself"
            )
        params.pop("to_keep")
        _deprecated("to_keep", "nothing (drop it)")
    cls = STRATEGIES.get(name)
    for legacy, current in (cls.legacy_names if cls else {}).items():
        if legacy in params:
            if current in params:
                raise ValueError(f"give {current!r} only, not also its legacy name {legacy!r}")
            _deprecated(legacy, current)
            params[current] = params.pop(legacy)
    if name == "MultiKrum" and "num_malicious_clients" in params:
        _deprecated("num_malicious_clients", "num_malicious_nodes")
        params["num_malicious_nodes"] = params.pop("num_malicious_clients")
    return name, params


def _deprecated(legacy: str, current: str) -> None:
    warnings.warn(f"strategy: {legacy} is a legacy Flower name; use {current}", StrategyDeprecation, stacklevel=3)


def check_params(name: str, params: Mapping[str, Any] | None, *, strict: bool = True) -> StrategyParams:
    """The validated parameter model (current names; defaults filled in). Raises pydantic's
    ValidationError whose locations are the parameter names, or ValueError for an unknown name."""
    return strategy_class(name).model_validate(dict(params or {}), strict=strict)


def resolved_params(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every parameter of the strategy by its current name: the defaults overlaid with ``params``."""
    name, params = normalize(name, params)
    return check_params(name, params).model_dump()


def problem(name: str, err: Any) -> str:
    """What is wrong with one parameter (a pydantic error of :func:`check_params`), naming the value."""
    if err["type"] == "extra_forbidden":
        accepted = [k for k, f in strategy_class(name).model_fields.items() if not f.exclude]
        return f"unknown parameter for {name}; accepted: {', '.join(accepted) or 'none'}"
    return f"{err['msg']} (got {err['input']!r}; see Flower's {name})"


def describe_error(name: str, exc: ValidationError) -> str:
    """One line per problem, naming the parameter and the value given."""
    return "; ".join(
        f"parameter {'.'.join(str(p) for p in err['loc'])!r} of {name}: {problem(name, err)}" for err in exc.errors()
    )


def parse_param(name: str, assignment: str) -> tuple[str, object]:
    """``key=value`` (command line) -> (key, value typed as the strategy's parameter)."""
    key, sep, text = assignment.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key:
        raise ValueError(f"--param {assignment!r}: expected key=value")
    for parse in (int, float):
        try:
            return key, parse(text)
        except ValueError:
            continue
    if text.lower() in ("true", "false"):
        return key, text.lower() == "true"
    return key, text
