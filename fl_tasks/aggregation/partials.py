"""Two-level aggregation: a region's partial aggregate and the global combination of partials.

FedAvg over all accepted updates is sum(n_i x_i) / sum(n_i). A region forwards its share exactly:
per tensor the float64 sum of n_i x_i over its accepted updates (a safetensors file of F64 tensors)
and the total n of those updates. The global level adds the regions' sums and divides by the sum of
their totals, which is flat FedAvg up to float64 rounding, then materialises the mean in the model's
dtype, as FedAvg does; a server optimiser (FedAvgM, FedAdagrad, FedAdam, FedYogi) then runs once on
that mean, exactly as it runs on the flat FedAvg result. It is never a plain mean of regional models.

Robust strategies (FedMedian, FedTrimmedAvg, Krum, Bulyan) do not compose exactly: each region
forwards its robust aggregate (``kind=model``) and the spec names how regions combine
(``across_regions.rule``: FedAvg weighted by the regions' example totals, or FedMedian).
Streamed chunk by chunk like every strategy here: memory O(chunk × inputs), not O(model × inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fl_tasks.aggregation import aggregate_files
from fl_tasks.aggregation.fedavg import check_weights, fedavg_files
from fl_tasks.aggregation.robust import median_files
from fl_tasks.aggregation.stream import SafetensorsFile, TensorSpec, UpdateSet, decode, encode, writing

PARTIAL_FORMAT = "airfed-partial/1"
#: Float64 sums of integer tensors (BatchNorm counters) stay exact up to 2**53.
SUM_DTYPE = "F64"


def write_partial_sum(inputs: Sequence[tuple[str | Path, float]], out_path: str | Path) -> float:
    """Write the region's partial: per tensor sum(n_i x_i) in float64; return sum(n_i)."""
    weights = check_weights([w for _p, w in inputs])
    total = float(weights.sum())
    with UpdateSet([p for p, _w in inputs]) as updates:
        layout = [(name, TensorSpec(SUM_DTYPE, updates.specs[name].shape)) for name in updates.order]
        size = updates.chunk_size(len(updates))
        wide = np.empty((len(updates), size), dtype=np.float64)
        acc = np.empty(size, dtype=np.float64)
        metadata = {"format": PARTIAL_FORMAT, "kind": "sum", "total_weight": repr(total)}
        with writing(out_path, layout, metadata) as writer:
            for name, spec, start, stop, stack in updates.stacked():
                n = stop - start
                decode(stack[:, :n], spec.dtype, wide[:, :n])
                np.matmul(weights, wide[:, :n], out=acc[:n])
                writer.write(name, start, acc[:n])
    return total


def combine_partial_sums(partials: Sequence[tuple[str | Path, float]], layout_path: str | Path,
                         out_path: str | Path) -> float:
    """FedAvg from regional partials: sum of the sums / sum of the totals, written in the dtypes of
    ``layout_path`` (the round's input global). Returns the total weight."""
    totals = check_weights([w for _p, w in partials])
    total = float(totals.sum())
    reference = SafetensorsFile(layout_path)
    try:
        specs = reference.specs
    finally:
        reference.close()
    with UpdateSet([p for p, _w in partials]) as sums:
        for name, spec in specs.items():
            if name not in sums.specs or sums.specs[name].shape != spec.shape:
                raise ValueError(f"regional partial {sums.files[0].path} does not match the model at tensor {name!r}")
        if set(sums.specs) != set(specs):
            raise ValueError(f"regional partial {sums.files[0].path} holds tensors the model lacks")
        layout = [(name, specs[name]) for name in sorted(specs, key=lambda n: (-specs[n].storage.itemsize, n))]
        size = sums.chunk_size(len(sums))
        ones = np.ones(len(sums), dtype=np.float64)
        acc = np.empty(size, dtype=np.float64)
        out_buf: dict[np.dtype, np.ndarray] = {}
        with writing(out_path, layout) as writer:
            for name, _spec, start, stop, stack in sums.stacked():
                n = stop - start
                np.matmul(ones, stack[:, :n], out=acc[:n])
                np.divide(acc[:n], total, out=acc[:n])
                target = specs[name]
                buf = out_buf.get(target.storage)
                if buf is None:
                    buf = out_buf[target.storage] = np.empty(size, dtype=target.storage)
                encode(acc[:n], target.dtype, buf[:n])
                writer.write(name, start, buf[:n])
    return total


def partial_info(path: str | Path) -> dict[str, str]:
    """The metadata of a partial file (format, kind, total_weight)."""
    partial = SafetensorsFile(path)
    partial.close()
    if partial.metadata.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"{path}: not an airfed regional partial (metadata {partial.metadata})")
    return partial.metadata


def write_region_model(strategy: str, params: Mapping[str, object], inputs: Sequence[tuple[str | Path, float]],
                       out_path: str | Path) -> float:
    """A robust strategy's regional aggregate (the region's model); returns the region's example total."""
    aggregate_files(strategy, params, inputs, out_path)
    return float(sum(w for _p, w in inputs))


def combine_region_models(rule: str, models: Sequence[tuple[str | Path, float]], out_path: str | Path) -> None:
    """Regional robust aggregates combined by the spec's named rule (``across_regions.rule``)."""
    if rule == "FedAvg":
        fedavg_files(models, out_path)
    elif rule == "FedMedian":
        median_files(models, out_path)
    else:
        raise ValueError(f"across_regions.rule {rule!r} is not defined; use FedAvg or FedMedian")


def global_from_partials(
    strategy: str,
    params: Mapping[str, object],
    partials: Sequence[tuple[str | Path, float]],
    out_path: str | Path,
    *,
    kind: str,
    rule: str | None,
    global_path: str | Path,
    state_in: str | Path | None = None,
    state_out: str | Path | None = None,
    scratch: str | Path,
) -> dict:
    """The new global from the regions' partials: combine, then the server optimiser once."""
    if kind == "model":
        if rule is None:
            raise ValueError(f"{strategy} does not compose across regions: name across_regions.rule")
        combine_region_models(rule, partials, out_path)
        return {"strategy": strategy, "state_written": False, "across_regions": rule}
    mean = Path(scratch) / "regions_fedavg.safetensors"
    total = combine_partial_sums(partials, global_path, mean)
    # the mean as FedAvg materialises it, given as the one input of the strategy: FedAvg/FedProx
    # return it unchanged, the FedOpt family applies its update to it once
    info = aggregate_files(strategy, params, [(mean, 1.0)], out_path,
                           global_path=global_path, state_in=state_in, state_out=state_out)
    info["total_weight"] = total
    return info
