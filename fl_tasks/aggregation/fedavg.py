"""FedAvg over safetensors files, streamed tensor by tensor.

Memory is O(model): one float64 accumulator for the tensor being averaged plus the output model;
inputs are memory-mapped, so the number of silos does not change the footprint. Weights are the
silos' example counts, as in Flower's ``aggregate`` (sum(w_i * x_i) / sum(w_i)).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from fl_tasks.weights import save_state_dict


def fedavg_files(inputs: Sequence[tuple[str | Path, float]], out_path: str | Path) -> None:
    if not inputs:
        raise ValueError("FedAvg needs at least one update")
    total = float(sum(weight for _path, weight in inputs))
    if total <= 0:
        raise ValueError("FedAvg needs a positive total weight")
    with ExitStack() as stack:
        handles = [(stack.enter_context(safe_open(str(p), framework="pt")), float(w)) for p, w in inputs]
        names = list(handles[0][0].keys())
        out: dict[str, torch.Tensor] = {}
        for name in names:
            acc: torch.Tensor | None = None
            dtype = None
            for handle, weight in handles:
                tensor = handle.get_tensor(name)
                dtype = tensor.dtype
                term = tensor.to(torch.float64) * (weight / total)
                acc = term if acc is None else acc.add_(term)
            if dtype is not None and not dtype.is_floating_point:
                acc = torch.round(acc)
            out[name] = acc.to(dtype)
    save_state_dict(out, out_path)
