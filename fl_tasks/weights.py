"""Model weights as safetensors files: the only format on the weight path (no pickle anywhere)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict as safetensors (tensors made contiguous, detached, on CPU)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(path), metadata=metadata)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


def tensor_specs(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) read from the safetensors header only (no tensor data)."""
    with safe_open(str(path), framework="pt") as fh:
        out = {}
        for name in fh.keys():
            sl = fh.get_slice(name)
            out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
        return out
