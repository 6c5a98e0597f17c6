"""Every strategy equals Flower's own code on the same random inputs.

Flower's aggregation functions (``flwr.server.strategy.aggregate``), its strategy classes
(``FedAvgM``, ``FedAdagrad``, ``FedAdam``, ``FedYogi`` via ``aggregate_fit``) and the current
``flwr.serverapp.strategy`` classes (Krum, MultiKrum, Bulyan via ``aggregate_train``) run on NumPy;
ours stream the same updates from safetensors files. Shapes, dtypes, silo counts and example counts
vary; chunking is also forced down to a few elements so multi-chunk paths run on small tensors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flower_reference import serverapp_train
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedMedian, FedTrimmedAvg, FedYogi, Krum
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.serverapp import strategy as serverapp
from safetensors.numpy import load_file, save_file

from fl_tasks.aggregation import aggregate_files, read_state_info, stream
from fl_tasks.aggregation.robust import sorted_rows, sorting_network
from fl_tasks.strategies import STRATEGIES, StrategyDeprecation, resolved_params

SHAPES = {
    "small": {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 72), "fc.bias": (10,), "scale": ()},
    "long": {"embed": (257, 33), "head": (33, 5)},
}
TOL = {np.float32: (2e-6, 2e-6), np.float64: (1e-12, 1e-12), np.float16: (2e-3, 2e-3)}


@pytest.fixture(params=["default", "tiny"])
def chunking(request, monkeypatch):
    """'tiny' forces chunks of a few elements, so every tensor spans many chunks."""
    if request.param == "tiny":
        monkeypatch.setattr(stream, "STACK_ELEMENTS", 97)
        monkeypatch.setattr(stream, "MIN_CHUNK", 5)
    return request.param


def make_updates(tmp_path, n, shapes, dtype, seed, base=None, max_weight=500, tag="u"):
    """n random updates as files and as Flower's (NDArrays, n) pairs.

    Around ``base`` (a global model), every update moves by a common random drift of +-0.05 per
    element plus its own noise: the server optimisers divide by |FedAvg - global|, so a delta near
    zero would turn float32 rounding (Flower computes in float32, we in float64) into visible
    differences; the drift keeps the comparison well-conditioned."""
    rng = np.random.default_rng(seed)
    drift = {name: rng.choice([-0.05, 0.05], size=shape) for name, shape in shapes.items()}
    inputs, results = [], []
    for i in range(n):
        state = {}
        for name, shape in shapes.items():
            noise = rng.standard_normal(shape)
            value = noise if base is None else base[name].astype(np.float64) + drift[name] + 0.01 * noise
            state[name] = np.asarray(value, dtype=dtype)
        weight = int(rng.integers(1, max_weight))
        path = tmp_path / f"{tag}{seed}_{i}.safetensors"
        save_file(state, str(path))
        inputs.append((path, weight))
        results.append(([state[name] for name in shapes], weight))
    return inputs, results


def run_ours(tmp_path, strategy, params, inputs, shapes, **kwargs):
    out = tmp_path / f"out_{strategy}.safetensors"
    info = aggregate_files(strategy, params, inputs, out, **kwargs)
    got = load_file(str(out))
    return [got[name] for name in shapes], info


def assert_equal_to_flower(ours, theirs, dtype):
    rtol, atol = TOL[dtype]
    for got, want in zip(ours, theirs, strict=True):
        assert got.dtype == np.dtype(dtype), "dtype must be preserved"
        assert got.shape == np.shape(want)
        np.testing.assert_allclose(got.astype(np.float64), np.asarray(want, dtype=np.float64), rtol=rtol, atol=atol)


# -- stateless strategies against Flower's functions -------------------------------------------------
CASES = [
    ("FedAvg", {}, lambda res: aggregate(res)),
    ("FedProx", {"proximal_mu": 0.1}, lambda res: aggregate(res)),
    ("FedMedian", {}, lambda res: aggregate_median(res)),
    ("FedTrimmedAvg", {}, lambda res: aggregate_trimmed_avg(res, 0.2)),
    ("FedTrimmedAvg", {"beta": 0.34}, lambda res: aggregate_trimmed_avg(res, 0.34)),
    ("Krum", {}, lambda res: aggregate_krum(res, 0, 0)),
    ("Krum", {"num_malicious_nodes": 2}, lambda res: aggregate_krum(res, 2, 0)),
    ("Krum", {"num_malicious_nodes": 2}, lambda res: serverapp_train(serverapp.Krum, res, num_malicious_nodes=2)),
    ("MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3}, lambda res: aggregate_krum(res, 1, 3)),
    ("MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
     lambda res: serverapp_train(serverapp.MultiKrum, res, num_malicious_nodes=1, num_nodes_to_select=3)),
    ("Bulyan", {}, lambda res: aggregate_bulyan(copy.deepcopy(res), 0, aggregate_krum, to_keep=0)),
    ("Bulyan", {}, lambda res: serverapp_train(serverapp.Bulyan, res)),
    ("Bulyan", {"num_malicious_nodes": 1}, lambda res: serverapp_train(serverapp.Bulyan, res, num_malicious_nodes=1)),
]


@pytest.mark.parametrize("strategy,params,flower", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_flower_function(tmp_path, chunking, strategy, params, flower, n, dtype):
    shapes = SHAPES["small" if n % 2 else "long"]
    inputs, results = make_updates(tmp_path, n, shapes, dtype, seed=n)
    ours, info = run_ours(tmp_path, strategy, params, inputs, shapes)
    theirs = flower(results)
    assert_equal_to_flower(ours, theirs, dtype)
    if strategy == "Krum":
        # Krum returns one of the updates, bit for bit
        chosen = info["selected"][0]
        assert all(np.array_equal(a, b) for a, b in zip(ours, results[chosen][0], strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(theirs, results[chosen][0], strict=True))


@pytest.mark.parametrize("strategy,params,flower", CASES[:6], ids=[f"{c[0]}{c[1] or ''}" for c in CASES[:6]])
@pytest.mark.parametrize("n", [1, 2, 3, 16])
def test_silo_counts_and_float16(tmp_path, strategy, params, flower, n):
    if strategy in ("Krum", "MultiKrum") and n < 3 and params:
        pytest.skip("needs more silos")
    shapes = SHAPES["small"]
    inputs, results = make_updates(tmp_path, n, shapes, np.float16, seed=100 + n, max_weight=20)
    ours, _ = run_ours(tmp_path, strategy, params, inputs, shapes)
    assert_equal_to_flower(ours, flower(results), np.float16)


@pytest.mark.parametrize(
    "cls,strategy,params",
    [
        (FedMedian, "FedMedian", {}),
        (FedTrimmedAvg, "FedTrimmedAvg", {"beta": 0.1}),
        (Krum, "MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 2}),
    ],
)
def test_equals_flower_strategy_objects(tmp_path, cls, strategy, params):
    """Flower's legacy strategy classes (``flwr.server.strategy``, ``aggregate_fit``)."""
    shapes = SHAPES["small"]
    inputs, results = make_updates(tmp_path, 9, shapes, np.float32, seed=7)
    kwargs = dict(params)
    if cls is Krum:
        kwargs = {"num_malicious_clients": 1, "num_clients_to_keep": 2}  # the legacy names
    flower = cls(**kwargs)
    parameters, _metrics = flower.aggregate_fit(1, fit_results(results), [])
    ours, _ = run_ours(tmp_path, strategy, params, inputs, shapes)
    assert_equal_to_flower(ours, parameters_to_ndarrays(parameters), np.float32)


# -- server optimisers against Flower's strategy objects, two rounds ---------------------------------
def fit_results(results):
    ok = Status(code=Code.OK, message="")
    return [(None, FitRes(ok, ndarrays_to_parameters(arrays), num, {})) for arrays, num in results]


FEDOPT_CASES = [
    (FedAvgM, "FedAvgM", {}),
    (FedAvgM, "FedAvgM", {"server_learning_rate": 0.7}),
    (FedAvgM, "FedAvgM", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
    (FedAdagrad, "FedAdagrad", {}),
    (FedAdagrad, "FedAdagrad", {"eta": 0.03, "tau": 1e-3}),
    (FedAdam, "FedAdam", {}),
    (FedAdam, "FedAdam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-4}),
    (FedYogi, "FedYogi", {}),
    (FedYogi, "FedYogi", {"eta": 0.02, "beta_1": 0.5, "tau": 1e-2}),
]


@pytest.mark.parametrize("cls,strategy,params", FEDOPT_CASES, ids=[f"{c[1]}{c[2] or ''}" for c in FEDOPT_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_server_optimizers_equal_flower_over_rounds(tmp_path, chunking, cls, strategy, params, dtype):
    shapes = SHAPES["small"]
    rng = np.random.default_rng(3)
    global0 = {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
    save_file(global0, str(tmp_path / "global_1.safetensors"))
    # Flower's legacy classes, given every parameter: their defaults predate the current ones (tau)
    flower = cls(initial_parameters=ndarrays_to_parameters([global0[name] for name in shapes]),
                 **resolved_params(strategy, params))

    state_in = None
    current = global0
    for rnd in (1, 2, 3):
        inputs, results = make_updates(tmp_path, 4, shapes, dtype, seed=10 * rnd, base=current, tag=f"r{rnd}_")
        parameters, _ = flower.aggregate_fit(rnd, fit_results(results), [])
        state_out = tmp_path / f"state_{rnd}.safetensors"
        ours, info = run_ours(
            tmp_path,
            strategy,
            params,
            inputs,
            shapes,
            global_path=tmp_path / f"global_{rnd}.safetensors",
            state_in=state_in,
            state_out=state_out,
        )
        assert_equal_to_flower(ours, parameters_to_ndarrays(parameters), dtype)
        current = dict(zip(shapes, ours, strict=True))
        save_file(current, str(tmp_path / f"global_{rnd + 1}.safetensors"))
        if info["state_written"]:
            assert read_state_info(state_out) == {
                "format": "airfed-server-state/1", "strategy": strategy, "step": str(rnd),
            }
            state_in = state_out
        else:
            assert strategy == "FedAvgM" and not params.get("server_momentum")
            assert not state_out.exists()


def test_state_of_another_strategy_starts_afresh(tmp_path):
    shapes = SHAPES["long"]
    rng = np.random.default_rng(0)
    global0 = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    save_file(global0, str(tmp_path / "g.safetensors"))
    inputs, _ = make_updates(tmp_path, 3, shapes, np.float32, seed=1, base=global0)
    g = tmp_path / "g.safetensors"
    aggregate_files("FedAdam", {}, inputs, tmp_path / "o1", global_path=g, state_out=tmp_path / "adam.st")
    info = aggregate_files("FedYogi", {}, inputs, tmp_path / "o2", global_path=g, state_in=tmp_path / "adam.st",
                           state_out=tmp_path / "yogi.st")
    assert "FedAdam" in info["state_reset"] and info["server_round"] == 1
    fresh = aggregate_files("FedYogi", {}, inputs, tmp_path / "o3", global_path=g)
    assert fresh["server_round"] == 1
    assert (tmp_path / "o2").read_bytes() == (tmp_path / "o3").read_bytes()


def test_fedopt_needs_the_global(tmp_path):
    inputs, _ = make_updates(tmp_path, 2, SHAPES["long"], np.float32, seed=2)
    with pytest.raises(ValueError, match="global"):
        aggregate_files("FedAdam", {}, inputs, tmp_path / "out")


# -- dtypes, layout, errors ----------------------------------------------------------------------------
def test_mixed_dtypes_are_preserved(tmp_path, chunking):
    import torch
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    rng = np.random.default_rng(5)
    inputs, states = [], []
    for i in range(5):
        state = {
            "w32": torch.from_numpy(rng.standard_normal((33, 7)).astype(np.float32)),
            "w64": torch.from_numpy(rng.standard_normal(19)),
            "wbf16": torch.from_numpy(rng.standard_normal((13, 3)).astype(np.float32)).to(torch.bfloat16),
            "steps": torch.tensor(int(rng.integers(0, 1000)), dtype=torch.int64),
            "mask": torch.from_numpy(rng.random(11) > 0.5),
            "empty": torch.zeros(0, 4),
        }
        path = tmp_path / f"m{i}.safetensors"
        torch_save(state, str(path))
        inputs.append((path, i + 1))
        states.append(state)
    weights = torch.tensor([w for _p, w in inputs], dtype=torch.float64)
    for strategy in ("FedAvg", "FedMedian"):
        out = tmp_path / f"{strategy}.safetensors"
        aggregate_files(strategy, {}, inputs, out)
        got = torch_load(str(out))
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in states[0].items()}
        for name, first in states[0].items():
            stacked = torch.stack([s[name].to(torch.float64) for s in states])
            if strategy == "FedAvg":
                want = (weights.view(-1, *[1] * first.dim()) * stacked).sum(0) / weights.sum()
            else:
                want = torch.quantile(stacked, 0.5, dim=0) if first.numel() else stacked.sum(0)
            if not first.is_floating_point():
                want = torch.round(want)
            if first.dtype == torch.float64:
                torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12)
            else:  # float64 accumulation rounded once to the stored dtype: exactly torch's rounding
                assert torch.equal(got[name], want.to(first.dtype)), name


def test_sorting_network_sorts():
    rng = np.random.default_rng(0)
    for n in list(range(1, 20)) + [31, 33, 64, 65, 70]:
        data = rng.standard_normal((n + 1, 50)).astype(np.float32)
        expected = np.sort(data[:n], axis=0)
        rows = sorted_rows(data, n, 50)
        np.testing.assert_array_equal(np.stack(rows), expected)
    assert len(sorting_network(16)) == 63


def test_output_is_deterministic_and_loadable(tmp_path):
    inputs, _ = make_updates(tmp_path, 5, SHAPES["small"], np.float32, seed=9)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    aggregate_files("FedAvg", {}, inputs, a)
    aggregate_files("FedAvg", {}, inputs, b)
    assert a.read_bytes() == b.read_bytes()
    from safetensors import safe_open

    with safe_open(str(a), framework="numpy") as fh:
        assert sorted(fh.keys()) == sorted(SHAPES["small"])


def test_mismatched_updates_are_refused(tmp_path):
    inputs, _ = make_updates(tmp_path, 2, SHAPES["small"], np.float32, seed=1)
    other, _ = make_updates(tmp_path, 1, {"conv.weight": (8, 3, 3, 2)}, np.float32, seed=2, tag="x")
    with pytest.raises(ValueError, match="missing"):
        aggregate_files("FedAvg", {}, inputs + other, tmp_path / "out")
    wrong = {**{k: np.zeros(s, np.float32) for k, s in SHAPES["small"].items()}, "fc.bias": np.zeros(11, np.float32)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"fc.bias.*F32\[11\]"):
        aggregate_files("FedMedian", {}, [*inputs, (tmp_path / "wrong.safetensors", 1)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "strategy,params,n,message",
    [
        ("FedMagic", {}, 3, "unknown strategy"),
        ("FedAvg", {"eta": 1.0}, 3, "parameter 'eta' of FedAvg: unknown parameter for FedAvg; accepted: none"),
        ("Krum", {"num_malicious_nodes": 0.5}, 3, "parameter 'num_malicious_nodes' of Krum: .*valid integer"),
        ("FedTrimmedAvg", {"beta": 0.5}, 4, r"parameter 'beta' of FedTrimmedAvg: .*less than 0.5 \(got 0.5;"),
        ("Bulyan", {"num_malicious_nodes": 1}, 6, "at least 4"),
        ("Bulyan", {"to_keep": 2}, 7, "to_keep"),
        ("MultiKrum", {"num_nodes_to_select": 9}, 3, "cannot select 9 of 3"),
        ("Krum", {"num_nodes_to_select": 2}, 3, "num_nodes_to_select"),
    ],
)
def test_bad_parameters_are_refused(tmp_path, strategy, params, n, message):
    inputs, _ = make_updates(tmp_path, n, SHAPES["long"], np.float32, seed=4)
    with pytest.raises(ValueError, match=message):
        aggregate_files(strategy, params, inputs, tmp_path / "out")


def test_every_strategy_name_is_implemented(tmp_path):
    shapes = SHAPES["long"]
    inputs, _ = make_updates(tmp_path, 5, shapes, np.float32, seed=6)
    for name in STRATEGIES:
        info = aggregate_files(name, {}, inputs, tmp_path / "out", global_path=inputs[0][0])
        assert info["strategy"] == name


@pytest.mark.parametrize(
    "legacy,current",
    [
        (("Krum", {"num_malicious_clients": 1}), ("Krum", {"num_malicious_nodes": 1})),
        (("Krum", {"num_malicious_clients": 1, "num_clients_to_keep": 3}),
         ("MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3})),
        (("Bulyan", {"num_malicious_clients": 1, "to_keep": 0}), ("Bulyan", {"num_malicious_nodes": 1})),
    ],
)
def test_legacy_names_still_work_with_a_deprecation_naming_the_new_one(tmp_path, legacy, current):
    inputs, _ = make_updates(tmp_path, 8, SHAPES["long"], np.float32, seed=8)
    with pytest.warns(StrategyDeprecation, match="legacy Flower name; use") as caught:
        old = aggregate_files(*legacy, inputs, tmp_path / "old")
    assert any(current[0] in str(w.message) or next(iter(current[1])) in str(w.message) for w in caught)
    new = aggregate_files(*current, inputs, tmp_path / "new")
    assert old["strategy"] == new["strategy"] == current[0] and old["params"] == new["params"]
    assert (tmp_path / "old").read_bytes() == (tmp_path / "new").read_bytes()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_defaults_are_flowers(name):
    """Every parameter and default as Flower's current class of the same name has them."""
    flower = getattr(serverapp, name)()
    for key, value in STRATEGIES[name]().model_dump().items():
        assert getattr(flower, key) == value, key
