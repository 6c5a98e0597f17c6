"""Two-level aggregation (regions → global) equals flat aggregation over the same accepted updates,
and Flower's own functions: FedAvg exactly (≤ 1e-6 relative), the server optimisers run once globally."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.server.strategy.aggregate import aggregate, aggregate_median
from safetensors.numpy import load_file, save_file

from fl_tasks.aggregation import aggregate_files, stream
from fl_tasks.aggregation.partials import (
    global_from_partials,
    partial_info,
    write_partial_sum,
    write_region_model,
)
from fl_tasks.strategies import resolved_params

SHAPES = {"w": (7, 5), "b": (5,), "emb": (3, 4, 2)}


@pytest.fixture(params=["default", "tiny"])
def chunking(request, monkeypatch):
    if request.param == "tiny":  # every tensor spans many chunks
        monkeypatch.setattr(stream, "STACK_ELEMENTS", 97)
        monkeypatch.setattr(stream, "MIN_CHUNK", 5)
    return request.param


def random_updates(tmp_path, n, dtype, seed, base=None):
    """``n`` random updates (files and arrays) with random example counts; around ``base`` if given
    (a common drift keeps FedAvg − global away from zero, see test_strategies.make_updates)."""
    rng = np.random.default_rng(seed)
    drift = {k: rng.choice([-0.05, 0.05], size=s) for k, s in SHAPES.items()}
    inputs, results = [], []
    for i in range(n):
        state = {}
        for k, s in SHAPES.items():
            value = rng.standard_normal(s) if base is None else base[k] + drift[k] + 0.01 * rng.standard_normal(s)
            state[k] = np.asarray(value, dtype=dtype)
        weight = int(rng.integers(1, 900))
        path = tmp_path / f"u{seed}_{i}.safetensors"
        save_file(state, str(path))
        inputs.append((path, weight))
        results.append(([state[k] for k in SHAPES], weight))
    return inputs, results


def split(items, sizes):
    """Uneven regions: consecutive groups of the given sizes (one region has a single silo)."""
    out, start = [], 0
    for size in sizes:
        out.append(items[start:start + size])
        start += size
    assert start == len(items)
    return out


def two_level(tmp_path, strategy, params, regions, global_path, **kwargs):
    partials = []
    for i, inputs in enumerate(regions):
        path = tmp_path / f"partial_{strategy}_{i}.safetensors"
        total = write_partial_sum(inputs, path)
        assert partial_info(path)["kind"] == "sum" and float(partial_info(path)["total_weight"]) == total
        partials.append((path, total))
    out = tmp_path / f"two_level_{strategy}.safetensors"
    info = global_from_partials(strategy, params, partials, out, kind="sum", rule=None, global_path=global_path,
                                scratch=tmp_path, **kwargs)
    return load_file(str(out)), info


def assert_close(got, want, rtol=1e-6):
    for key in SHAPES:
        want_k = np.asarray(want[key], dtype=np.float64)
        np.testing.assert_allclose(got[key].astype(np.float64), want_k, rtol=rtol, atol=rtol * np.abs(want_k).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes", [(4, 1, 2), (1, 6), (2, 2, 3, 1)])
def test_two_level_fedavg_equals_flat_and_flower(tmp_path, chunking, dtype, sizes):
    inputs, results = random_updates(tmp_path, sum(sizes), dtype, seed=sum(sizes) * 7 + len(sizes))
    global_path = inputs[0][0]  # any file with the model's layout
    got, info = two_level(tmp_path, "FedAvg", {}, split(inputs, sizes), global_path)
    flat = tmp_path / "flat.safetensors"
    aggregate_files("FedAvg", {}, inputs, flat)
    assert_close(got, load_file(str(flat)))
    assert_close(got, dict(zip(SHAPES, aggregate(results), strict=True)))  # Flower's aggregate
    assert all(got[k].dtype == np.dtype(dtype) for k in SHAPES)
    assert info["total_weight"] == sum(w for _p, w in inputs)


def test_two_level_is_not_a_plain_mean_of_regional_models(tmp_path):
    """Uneven regions: the mean of the regional FedAvg models differs from FedAvg; ours does not."""
    inputs, results = random_updates(tmp_path, 5, np.float64, seed=11)
    regions = split(inputs, (4, 1))
    got, _ = two_level(tmp_path, "FedAvg", {}, regions, inputs[0][0])
    regional_models = [aggregate([r for r in results[:4]]), aggregate(results[4:])]
    naive = {k: (regional_models[0][i] + regional_models[1][i]) / 2 for i, k in enumerate(SHAPES)}
    flower = dict(zip(SHAPES, aggregate(results), strict=True))
    assert_close(got, flower, rtol=1e-12)
    assert not np.allclose(naive["w"], flower["w"], rtol=1e-3)


def fit_results(results):
    ok = Status(code=Code.OK, message="")
    return [(None, FitRes(ok, ndarrays_to_parameters(arrays), num, {})) for arrays, num in results]


@pytest.mark.parametrize("cls,strategy,params", [
    (FedAvgM, "FedAvgM", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
    (FedAdagrad, "FedAdagrad", {"eta": 0.03, "tau": 1e-3}),
    (FedAdam, "FedAdam", {}),
    (FedYogi, "FedYogi", {"eta": 0.02, "beta_1": 0.5, "tau": 1e-2}),
])
def test_server_optimizer_runs_once_globally(tmp_path, cls, strategy, params):
    """Three rounds over uneven regions: the global optimiser step on the combined partials equals
    the flat strategy and Flower's strategy object (state carried between rounds)."""
    dtype = np.float32
    rng = np.random.default_rng(5)
    current = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    flower = cls(initial_parameters=ndarrays_to_parameters([current[k] for k in SHAPES]),
                 **resolved_params(strategy, params))
    state_two, state_flat = None, None
    for rnd in (1, 2, 3):
        global_path = tmp_path / f"global_{rnd}.safetensors"
        save_file(current, str(global_path))
        inputs, results = random_updates(tmp_path, 6, dtype, seed=100 + rnd, base=current)
        out_state_two = tmp_path / f"state_two_{rnd}.safetensors"
        got, _ = two_level(tmp_path, strategy, params, split(inputs, (3, 1, 2)), global_path,
                           state_in=state_two, state_out=out_state_two)
        flat_out, out_state_flat = tmp_path / f"flat_{rnd}.safetensors", tmp_path / f"state_flat_{rnd}.safetensors"
        aggregate_files(strategy, params, inputs, flat_out, global_path=global_path, state_in=state_flat,
                        state_out=out_state_flat)
        parameters, _ = flower.aggregate_fit(rnd, fit_results(results), [])
        assert_close(got, load_file(str(flat_out)))
        assert_close(got, dict(zip(SHAPES, parameters_to_ndarrays(parameters), strict=True)), rtol=2e-6)
        state_two, state_flat, current = out_state_two, out_state_flat, got


def test_robust_per_region_then_named_rule(tmp_path):
    """FedMedian per region, then FedMedian (or example-weighted FedAvg) across regions: what the
    spec names, computed with Flower's functions at both levels."""
    inputs, results = random_updates(tmp_path, 7, np.float64, seed=3)
    sizes = (3, 1, 3)
    regions, regional_results = split(inputs, sizes), split(results, sizes)
    models = []
    for i, region in enumerate(regions):
        path = tmp_path / f"region_{i}.safetensors"
        models.append((path, write_region_model("FedMedian", {}, region, path)))
    flower_regional = [(aggregate_median(r), sum(n for _a, n in r)) for r in regional_results]
    expected = {"FedMedian": aggregate_median(flower_regional), "FedAvg": aggregate(flower_regional)}
    for rule, flower_global in expected.items():
        out = tmp_path / f"global_{rule}.safetensors"
        global_from_partials("FedMedian", {}, models, out, kind="model", rule=rule, global_path=inputs[0][0],
                             scratch=tmp_path)
        assert_close(load_file(str(out)), dict(zip(SHAPES, flower_global, strict=True)), rtol=1e-12)
    with pytest.raises(ValueError, match="across_regions.rule"):
        global_from_partials("FedMedian", {}, models, tmp_path / "x.safetensors", kind="model", rule=None,
                             global_path=inputs[0][0], scratch=tmp_path)
