"""Byzantine-robust strategies over safetensors files: FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan.

Same results as Flower's ``flwr.serverapp.strategy`` classes of those names (the example counts are
ignored, except by MultiKrum's final average; Bulyan selects with ``select_multikrum``), streamed:

- Median and trimmed mean are elementwise, so each tensor is processed in chunks: the N slices of a
  chunk are sorted per element with a sorting network of vectorised min/max operations (for N <= 64;
  ``np.sort`` beyond), then the middle order statistics are averaged in float64.
- Krum and Bulyan need squared distances between whole flattened updates. The N x N matrix is
  accumulated chunk by chunk as a Gram matrix of the chunk's rows centred on the first update
  (float64), then the selection follows Flower's code path on it. Krum then copies the chosen update;
  MultiKrum averages the kept ones; Bulyan runs a second pass over the selected updates.

Memory is O(N x chunk) for every strategy here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path

import numpy as np

from fl_tasks.aggregation.fedavg import check_weights, write_mean
from fl_tasks.aggregation.stream import TensorSpec, UpdateSet, compute_dtype, decode, encode, writing

NETWORK_MAX_ROWS = 64


# -- sorting ----------------------------------------------------------------------------------------
@cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort comparators for ``n`` inputs (padded to a power of two; a
    comparator touching a padding slot, which holds +inf, never moves anything and is dropped)."""
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []

    def merge(lo: int, hi: int, r: int) -> None:
        step = r * 2
        if step < hi - lo + 1:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            pairs.extend((i, i + r) for i in range(lo + r, hi - r + 1, step))
        else:
            pairs.append((lo, lo + r))

    def sort(lo: int, hi: int) -> None:
        if hi > lo:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid + 1, hi)
            merge(lo, hi, 1)

    sort(0, size - 1)
    return tuple((i, j) for i, j in pairs if j < n)


def sorted_rows(stack: np.ndarray, count: int, n: int) -> list[np.ndarray]:
    """Rows 0..count-1 of ``stack[:, :n]`` sorted elementwise (ascending); ``stack`` must have one
    spare row (``count`` + 1 rows). Returns views into ``stack`` (its row order is scrambled)."""
    if count > NETWORK_MAX_ROWS:
        block = stack[:count, :n]
        block.sort(axis=0)
        return list(block)
    rows = [stack[i, :n] for i in range(count)]
    spare = stack[count, :n]
    for i, j in sorting_network(count):
        np.minimum(rows[i], rows[j], out=spare)
        np.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return rows


class _SortedChunks:
    """Reads the chunks of selected updates and sorts them per element."""

    def __init__(self, updates: UpdateSet, rows: Sequence[int]):
        self.updates, self.rows = updates, list(rows)
        self.size = updates.chunk_size(len(self.rows) + 1)
        self._work: dict[np.dtype, np.ndarray] = {}

    def __iter__(self) -> Iterator[tuple[str, TensorSpec, int, int, list[np.ndarray]]]:
        count = len(self.rows)
        for name, spec, start, stop, stack in self.updates.stacked(self.rows, spare_rows=1):
            n = stop - start
            work_dtype = compute_dtype(spec.dtype)
            if spec.storage == work_dtype:
                work = stack  # sorted in place: the buffer is ours until the next chunk
            else:
                if work_dtype not in self._work:
                    self._work[work_dtype] = np.empty((count + 1, self.size), dtype=work_dtype)
                work = self._work[work_dtype]
                decode(stack[:count, :n], spec.dtype, work[:count, :n])
            yield name, spec, start, n, sorted_rows(work, count, n)


def _median_into(rows: list[np.ndarray], out: np.ndarray) -> None:
    """Median of sorted rows, as ``np.median``: the middle one, or the mean of the middle two."""
    count = len(rows)
    mid = count // 2
    if count % 2:
        np.copyto(out, rows[mid], casting="unsafe")
    else:
        np.add(rows[mid - 1], rows[mid], out=out, dtype=np.float64)
        np.multiply(out, 0.5, out=out)


def _write_order_statistic(
    updates: UpdateSet, out_path: str | Path, reduce: Callable[[list[np.ndarray], np.ndarray], None]
) -> None:
    rows = list(range(len(updates)))
    chunks = _SortedChunks(updates, rows)
    acc = np.empty(chunks.size, dtype=np.float64)
    out_raw: dict[np.dtype, np.ndarray] = {}
    with writing(out_path, [(name, updates.specs[name]) for name in updates.order]) as writer:
        for name, spec, start, n, ordered in chunks:
            reduce(ordered, acc[:n])
            buf = out_raw.get(spec.storage)
            if buf is None:
                buf = out_raw[spec.storage] = np.empty(chunks.size, dtype=spec.storage)
            encode(acc[:n], spec.dtype, buf[:n])
            writer.write(name, start, buf[:n])


# -- FedMedian / FedTrimmedAvg -------------------------------------------------------------------------
def median_files(inputs: Sequence[tuple[str | Path, float]], out_path: str | Path) -> dict:
    """Flower's ``aggregate_median``: the elementwise median of the updates (weights ignored)."""
    with UpdateSet([p for p, _w in inputs]) as updates:
        _write_order_statistic(updates, out_path, _median_into)
    return {}


def trim_bounds(count: int, beta: float) -> tuple[int, int]:
    """Flower's ``_trim_mean`` cut: drop int(beta * N) updates at each end of every element's order."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"FedTrimmedAvg beta must be in [0, 0.5), got {beta}")
    lowercut = int(beta * count)
    uppercut = count - lowercut
    if lowercut >= uppercut:
        raise ValueError(f"FedTrimmedAvg beta={beta} cuts all {count} updates")
    return lowercut, uppercut


def trimmed_avg_files(inputs: Sequence[tuple[str | Path, float]], out_path: str | Path, beta: float) -> dict:
    """Flower's ``aggregate_trimmed_avg``: per element, the mean of the values left after cutting
    int(beta * N) from each end (weights ignored)."""
    lo, hi = trim_bounds(len(inputs), beta)

    def trimmed(rows: list[np.ndarray], out: np.ndarray) -> None:
        np.copyto(out, rows[lo], casting="unsafe")
        for row in rows[lo + 1 : hi]:
            np.add(out, row, out=out, dtype=np.float64)
        np.divide(out, hi - lo, out=out)

    with UpdateSet([p for p, _w in inputs]) as updates:
        _write_order_statistic(updates, out_path, trimmed)
    return {"trimmed": [lo, len(inputs) - hi]}


# -- Krum / MultiKrum / Bulyan ---------------------------------------------------------------------
def squared_distances(updates: UpdateSet) -> np.ndarray:
    """N x N squared L2 distances between the flattened updates (all tensors), in float64."""
    count = len(updates)
    size = updates.chunk_size(count)
    gram = np.zeros((count, count), dtype=np.float64)
    wide = np.empty((count, size), dtype=np.float64)
    for _name, spec, start, stop, stack in updates.stacked():
        n = stop - start
        block = wide[:, :n]
        decode(stack[:, :n], spec.dtype, block)
        np.subtract(block[1:], block[0], out=block[1:])  # centre on update 0: distances are unchanged
        centred = block[1:]
        gram[1:, 1:] += centred @ centred.T
    gram = (gram + gram.T) / 2
    diag = np.diag(gram)
    dist = diag[:, None] + diag[None, :] - 2 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(dist: np.ndarray, num_malicious: int) -> list[float]:
    """Flower's Krum score: per update, the sum of its n - f - 2 smallest distances to the others."""
    num_closest = max(1, len(dist) - num_malicious - 2)
    closest = [np.argsort(row)[1 : num_closest + 1].tolist() for row in dist]
    return [float(np.sum(dist[i, closest[i]])) for i in range(len(dist))]


def krum_select(dist: np.ndarray, num_malicious: int, num_to_select: int) -> list[int]:
    """Indices Flower's ``select_multikrum`` keeps: the ``num_to_select`` lowest Krum scores."""
    scores = krum_scores(dist, num_malicious)
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_to_select]]


def _copy_update(updates: UpdateSet, index: int, out_path: str | Path) -> None:
    size = updates.chunk_size(1)
    raw: dict[np.dtype, np.ndarray] = {}
    with writing(out_path, [(name, updates.specs[name]) for name in updates.order]) as writer:
        for name, spec, start, stop in updates.chunks(1):
            buf = raw.get(spec.storage)
            if buf is None:
                buf = raw[spec.storage] = np.empty(size, dtype=spec.storage)
            updates.files[index].read(name, start, buf[: stop - start])
            writer.write(name, start, buf[: stop - start])


def krum_files(
    inputs: Sequence[tuple[str | Path, float]], out_path: str | Path, num_malicious: int, num_to_select: int = 1
) -> dict:
    """Flower's Krum / MultiKrum (``select_multikrum``): the update with the lowest Krum score, copied
    bit for bit (Krum), or the example-weighted mean of the ``num_to_select`` lowest-scoring ones."""
    if num_malicious < 0 or num_to_select < 1:
        raise ValueError(f"Krum needs num_malicious_nodes >= 0 and num_nodes_to_select >= 1, got "
                         f"{num_malicious} and {num_to_select}")
    if num_to_select > len(inputs):
        raise ValueError(f"MultiKrum cannot select {num_to_select} of {len(inputs)} updates (num_nodes_to_select)")
    weights = check_weights([w for _p, w in inputs], "MultiKrum") if num_to_select > 1 else None
    with UpdateSet([p for p, _w in inputs]) as updates:
        selected = krum_select(squared_distances(updates), num_malicious, num_to_select)
        if weights is not None:
            write_mean(updates, weights, out_path, selected)
        else:
            _copy_update(updates, selected[0], out_path)
    return {"selected": selected}


def bulyan_files(inputs: Sequence[tuple[str | Path, float]], out_path: str | Path, num_malicious: int) -> dict:
    """Flower's Bulyan with its default selection rule, ``select_multikrum``: keep the n - 2f updates
    with the lowest Krum scores, then per element average the n - 4f values closest to their median."""
    count = len(inputs)
    if num_malicious < 0:
        raise ValueError(f"Bulyan needs num_malicious_nodes >= 0, got {num_malicious}")
    if count < 4 * num_malicious + 3:
        raise ValueError(
            f"Bulyan needs at least 4 * num_malicious_nodes + 3 = {4 * num_malicious + 3} updates, got {count}"
        )
    theta = count - 2 * num_malicious
    beta = theta - 2 * num_malicious
    with UpdateSet([p for p, _w in inputs]) as updates:
        selected = sorted(krum_select(squared_distances(updates), num_malicious, theta))
        chunks = _SortedChunks(updates, selected)
        size = chunks.size
        wide = np.empty((theta, size), dtype=np.float64)
        med = np.empty(size, dtype=np.float64)
        acc = np.empty(size, dtype=np.float64)
        cols = np.arange(size)
        out_raw: dict[np.dtype, np.ndarray] = {}
        with writing(out_path, [(name, updates.specs[name]) for name in updates.order]) as writer:
            for name, spec, start, n, ordered in chunks:
                buf = out_raw.get(spec.storage)
                if buf is None:
                    buf = out_raw[spec.storage] = np.empty(size, dtype=spec.storage)
                m = med[:n]
                _median_into(ordered, m)
                # Flower compares against the median as materialised in the tensor's dtype
                encode(m, spec.dtype, buf[:n])
                decode(buf[:n], spec.dtype, m)
                block = wide[:, :n]
                for r, row in enumerate(ordered):
                    np.copyto(block[r], row, casting="unsafe")
                # the beta values closest to the median are a window of the sorted order: drop the
                # farther end 2f times
                lo = np.zeros(n, dtype=np.intp)
                hi = np.full(n, theta - 1, dtype=np.intp)
                c = cols[:n]
                for _ in range(theta - beta):
                    drop_lo = (m - block[lo, c]) > (block[hi, c] - m)
                    lo += drop_lo
                    hi -= ~drop_lo
                a = acc[:n]
                a.fill(0.0)
                for r in range(theta):
                    a += np.where((lo <= r) & (r <= hi), block[r], 0.0)
                np.divide(a, beta, out=a)
                encode(a, spec.dtype, buf[:n])
                writer.write(name, start, buf[:n])
    return {"selected": selected}
