"""Streaming FedAvg over safetensors equals Flower's own ``aggregate`` on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate as flower_aggregate

from fl_tasks.aggregation import aggregate_files
from fl_tasks.weights import load_state_dict, save_state_dict


def random_updates(tmp_path, n: int, shapes: dict[str, tuple[int, ...]], seed: int):
    rng = np.random.default_rng(seed)
    inputs, arrays = [], []
    for i in range(n):
        state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        weight = int(rng.integers(1, 500))
        path = tmp_path / f"u{i}.safetensors"
        save_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, path)
        inputs.append((path, weight))
        arrays.append(([state[name] for name in shapes], weight))
    return inputs, arrays


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_fedavg_equals_flower(tmp_path, n, seed):
    shapes = {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "scalar": ()}
    inputs, arrays = random_updates(tmp_path, n, shapes, seed)
    out = tmp_path / "out.safetensors"
    aggregate_files("FedAvg", {}, inputs, out)
    ours = load_state_dict(out)
    expected = flower_aggregate(arrays)
    for name, want in zip(shapes, expected, strict=True):
        assert ours[name].dtype == torch.float32
        np.testing.assert_allclose(ours[name].numpy(), want, rtol=1e-6, atol=1e-6)


def test_unknown_strategy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown strategy"):
        aggregate_files("FedMagic", {}, [], tmp_path / "x")
