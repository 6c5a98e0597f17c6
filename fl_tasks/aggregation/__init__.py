"""Aggregation strategies over safetensors files, by Flower's strategy names.

One module per strategy family: :mod:`.fedavg` (FedAvg, FedProx), :mod:`.fedopt` (FedAvgM,
FedAdagrad, FedAdam, FedYogi), :mod:`.robust` (FedMedian, FedTrimmedAvg, Krum/MultiKrum, Bulyan);
:mod:`.stream` reads and writes the files chunk by chunk. NumPy only: importing this package does
not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_tasks import strategies
from fl_tasks.aggregation.fedavg import fedavg_files
from fl_tasks.aggregation.fedopt import fedopt_files, read_state_info
from fl_tasks.aggregation.robust import bulyan_files, krum_files, median_files, trimmed_avg_files
from fl_tasks.aggregation.stream import single_threaded_blas
from fl_tasks.strategies import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
)

#: strategies that read the round's input global and keep server optimiser state between rounds
FEDOPT = (FedAvgM, FedAdagrad, FedAdam, FedYogi)

__all__ = ["FEDOPT", "aggregate_files", "read_state_info"]


def aggregate_files(
    strategy: str,
    params: Mapping[str, object] | None,
    inputs: Sequence[tuple[str | Path, float]],
    out_path: str | Path,
    *,
    global_path: str | Path | None = None,
    state_in: str | Path | None = None,
    state_out: str | Path | None = None,
) -> dict:
    """Aggregate ``inputs`` ((path, num_examples) pairs) into ``out_path`` with ``strategy``.

    ``params`` are the strategy's parameters by Flower's names (legacy names are mapped, with a
    warning). ``global_path`` is the round's input global model and ``state_in``/``state_out`` the
    server optimiser state before/after the round; only the FedOpt family (FedAvgM, FedAdagrad,
    FedAdam, FedYogi) uses them. Returns what was done: the resolved ``params``, ``selected``
    update indices (Krum, MultiKrum, Bulyan), ``server_round`` and ``state_written`` (FedOpt family).
    """
    name, given = strategies.normalize(strategy, params)
    try:
        model = strategies.check_params(name, given)
    except strategies.ValidationError as exc:
        raise ValueError(strategies.describe_error(name, exc)) from None
    if not inputs:
        raise ValueError(f"{name} needs at least one update")
    resolved = model.model_dump()
    info: dict = {"strategy": name, "params": resolved, "num_updates": len(inputs)}
    with single_threaded_blas():
        if isinstance(model, FEDOPT):
            info.update(
                fedopt_files(
                    name, resolved, inputs, out_path,
                    global_path=global_path, state_in=state_in, state_out=state_out,
                )
            )
        elif isinstance(model, FedMedian):
            info.update(median_files(inputs, out_path))
        elif isinstance(model, FedTrimmedAvg):
            info.update(trimmed_avg_files(inputs, out_path, model.beta))
        elif isinstance(model, MultiKrum):  # Krum too: MultiKrum selecting one
            info.update(krum_files(inputs, out_path, model.num_malicious_nodes, model.num_nodes_to_select))
        elif isinstance(model, Bulyan):
            info.update(bulyan_files(inputs, out_path, model.num_malicious_nodes))
        else:  # FedAvg, FedProx
            info.update(fedavg_files(inputs, out_path))
    info.setdefault("state_written", False)
    return info
