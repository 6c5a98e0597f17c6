"""FedAvg (and FedProx, which aggregates the same way) over safetensors files, streamed.

Flower's ``aggregate``: sum(n_i * x_i) / sum(n_i), per tensor. Here every tensor is cut into chunks;
for each chunk the N updates' slices are read into one (N x chunk) buffer, widened to float64 and
reduced with one matrix-vector product against the weights, then divided by the total and cast back
to the tensor's dtype (integers are rounded). Memory is a fixed number of chunk buffers: it does not
grow with N or with the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fl_tasks.aggregation.stream import TensorSpec, UpdateSet, decode, encode, writing


def check_weights(weights: Sequence[float], strategy: str = "FedAvg") -> np.ndarray:
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{strategy} weights (num_examples) must be finite and >= 0, got {list(weights)}")
    if w.sum() <= 0:
        raise ValueError(f"{strategy} needs a positive total weight (num_examples), got {list(weights)}")
    return w


def weighted_means(
    updates: UpdateSet, weights: np.ndarray, rows: Sequence[int] | None = None
) -> Iterator[tuple[str, TensorSpec, int, int, np.ndarray]]:
    """Yield (name, spec, start, stop, mean) per chunk: the weighted mean of ``rows`` in float64.

    The yielded array is a view into a reused buffer: consume it before asking for the next chunk."""
    rows = list(range(len(updates))) if rows is None else list(rows)
    w = np.asarray(weights, dtype=np.float64)[rows]
    total = float(w.sum())
    size = updates.chunk_size(len(rows))
    wide = np.empty((len(rows), size), dtype=np.float64)
    acc = np.empty(size, dtype=np.float64)
    for name, spec, start, stop, stack in updates.stacked(rows):
        n = stop - start
        block = wide[:, :n]
        decode(stack[:, :n], spec.dtype, block)
        out = acc[:n]
        np.matmul(w, block, out=out)
        np.divide(out, total, out=out)
        yield name, spec, start, stop, out


def write_mean(
    updates: UpdateSet, weights: np.ndarray, out_path: str | Path, rows: Sequence[int] | None = None
) -> None:
    layout = [(name, updates.specs[name]) for name in updates.order]
    size = updates.chunk_size(len(updates) if rows is None else len(rows))
    out_raw: dict[np.dtype, np.ndarray] = {}
    with writing(out_path, layout) as writer:
        for name, spec, start, _stop, mean in weighted_means(updates, weights, rows):
            buf = out_raw.get(spec.storage)
            if buf is None:
                buf = out_raw[spec.storage] = np.empty(size, dtype=spec.storage)
            encode(mean, spec.dtype, buf[: mean.size])
            writer.write(name, start, buf[: mean.size])


def fedavg_files(inputs: Sequence[tuple[str | Path, float]], out_path: str | Path) -> dict:
    """FedAvg / FedProx: the example-weighted mean of the updates."""
    weights = check_weights([w for _p, w in inputs])
    with UpdateSet([p for p, _w in inputs]) as updates:
        write_mean(updates, weights, out_path)
    return {}
