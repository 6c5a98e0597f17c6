"""Model weights as safetensors files: the only format on the weight path (no pickle anywhere).

Files are byte-for-byte reproducible: safetensors writes ``__metadata__`` in the order of a Rust
HashMap, which is random per process, so the same tensors and keys would get a different sha256 in
another process (another retry, another pod). The metadata is therefore written as one key,
``airfed``, holding the given keys as sorted JSON; :func:`read_metadata` gives them back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

METADATA_KEY = "airfed"


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict as safetensors (tensors made contiguous, detached, on CPU); the same
    tensors and metadata always give the same bytes."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    packed = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))} if metadata else None
    save_file(tensors, str(path), metadata=packed)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata :func:`save_state_dict` wrote (a file written elsewhere: its metadata as it is)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if set(meta) == {METADATA_KEY}:
        return json.loads(meta[METADATA_KEY])
    return meta


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
