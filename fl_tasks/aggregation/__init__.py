"""Aggregation strategies over safetensors files, by Flower's strategy names.

One module per strategy family: :mod:`.fedavg` (FedAvg, FedProx), :mod:`.fedopt` (FedAvgM,
FedAdagrad, FedAdam, FedYogi), :mod:`.robust` (FedMedian, FedTrimmedAvg, Krum/MultiKrum, Bulyan);
:mod:`.stream` reads and writes the files chunk by chunk. NumPy only: importing this package does
not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_tasks.aggregation.fedavg import fedavg_files
from fl_tasks.aggregation.fedopt import fedopt_files, read_state_info
from fl_tasks.aggregation.robust import bulyan_files, krum_files, median_files, trimmed_avg_files
from fl_tasks.aggregation.stream import single_threaded_blas
from fl_tasks.strategy_names import resolve_strategy_params

FEDOPT = ("FedAvgM", "FedAdagrad", "FedAdam", "FedYogi")
#: strategies whose result does not depend on the example counts (Flower ignores them too)
IGNORES_WEIGHTS = ("FedMedian", "FedTrimmedAvg", "Bulyan")
#: strategies that read the round's input global and keep server optimiser state between rounds
STATEFUL = FEDOPT

__all__ = ["FEDOPT", "IGNORES_WEIGHTS", "STATEFUL", "aggregate_files", "read_state_info"]


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

    ``global_path`` is the round's input global model and ``state_in``/``state_out`` the server
    optimiser state before/after the round; only the FedOpt family (FedAvgM, FedAdagrad, FedAdam,
    FedYogi) uses them. Returns what was done: the resolved ``params``, ``selected`` update indices
    (Krum, Bulyan), ``server_round`` and ``state_written`` (FedOpt family).
    """
    resolved = resolve_strategy_params(strategy, params)
    if not inputs:
        raise ValueError(f"{strategy} needs at least one update")
    info: dict = {"strategy": strategy, "params": resolved, "num_updates": len(inputs)}
    with single_threaded_blas():
        if strategy in ("FedAvg", "FedProx"):
            info.update(fedavg_files(inputs, out_path))
        elif strategy in FEDOPT:
            info.update(
                fedopt_files(
                    strategy, resolved, inputs, out_path,
                    global_path=global_path, state_in=state_in, state_out=state_out,
                )
            )
        elif strategy == "FedMedian":
            info.update(median_files(inputs, out_path))
        elif strategy == "FedTrimmedAvg":
            info.update(trimmed_avg_files(inputs, out_path, float(resolved["beta"])))
        elif strategy == "Krum":
            info.update(
                krum_files(
                    inputs, out_path, int(resolved["num_malicious_clients"]), int(resolved["num_clients_to_keep"])
                )
            )
        elif strategy == "Bulyan":
            info.update(
                bulyan_files(inputs, out_path, int(resolved["num_malicious_clients"]), int(resolved["to_keep"]))
            )
        else:  # pragma: no cover - STRATEGY_PARAMS and this dispatch are kept in step by the tests
            raise NotImplementedError(f"strategy {strategy} is not implemented")
    info.setdefault("state_written", False)
    return info

