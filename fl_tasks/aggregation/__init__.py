"""Aggregation strategies over safetensors files, by Flower's strategy names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fl_tasks.aggregation.fedavg import fedavg_files
from fl_tasks.strategy_names import STRATEGY_PARAMS


def aggregate_files(
    strategy: str,
    params: dict,
    inputs: Sequence[tuple[str | Path, float]],
    out_path: str | Path,
) -> None:
    """Aggregate ``inputs`` ((path, num_examples) pairs) into ``out_path`` with ``strategy``."""
    if strategy not in STRATEGY_PARAMS:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGY_PARAMS)}")
    if strategy in ("FedAvg", "FedProx"):
        fedavg_files(inputs, out_path)
        return
    raise NotImplementedError(f"strategy {strategy} is not implemented")
