"""Differential privacy (fl_tasks/privacy.py) against Flower's own fixed-clipping helpers.

Flower's formulas live in ``flwr.supercore.differential_privacy`` (what
``flwr.serverapp.strategy.DifferentialPrivacy{Server,Client}SideFixedClipping`` and the
``fixedclipping_mod`` call): ``compute_stdv`` and ``compute_clip_model_update``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm
from scipy import stats

from fl_tasks.guards import check_update
from fl_tasks.privacy import add_gaussian_noise, clip_factor, clip_file, clip_state, noise_stddev
from fl_tasks.weights import load_state_dict, save_state_dict


def _states(scale: float, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(update, global) float32 states whose difference has L2 norm of order ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"l1.weight": (16, 8), "l1.bias": (16,), "l2.weight": (4, 16), "l2.bias": (4,)}
    global_state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    delta = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    update = {k: global_state[k] + delta[k] * (scale / norm) for k in shapes}
    return update, global_state


def _delta_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return get_norm([np.asarray(a[k], dtype=np.float64) - np.asarray(b[k], dtype=np.float64) for k in b])


# --- noise std --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "c", "n"), [(1.0, 1.0, 1), (0.5, 2.0, 3), (1.1, 0.1, 10), (0.0, 5.0, 4), (3.0, 10.0, 500)]
)
def test_noise_stddev_is_flowers_compute_stdv(z, c, n):
    assert noise_stddev(z, c, n) == pytest.approx(compute_stdv(z, c, n), rel=1e-15)


def test_noise_stddev_shrinks_with_the_number_of_updates():
    assert noise_stddev(1.0, 2.0, 4) == pytest.approx(noise_stddev(1.0, 2.0, 1) / 4)


# --- clipping ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "c", "expected"),
    [(10.0, 2.0, 0.2), (2.0, 2.0, 1.0), (1.0, 2.0, 1.0), (0.0, 2.0, 1.0), (1e-12, 1.0, 1.0), (3.0, 1.5, 0.5)],
)
def test_clip_factor(norm, c, expected):
    assert clip_factor(norm, c) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("scale", [0.3, 1.0, 5.0, 80.0])
def test_clip_state_matches_flowers_compute_clip_model_update(scale):
    clipping_norm = 1.0
    update, global_state = _states(scale)
    ours, norm = clip_state(update, global_state, clipping_norm)
    assert norm == pytest.approx(_delta_norm(update, global_state), rel=1e-12)

    keys = list(global_state)
    theirs = [np.asarray(update[k], dtype=np.float64).copy() for k in keys]
    compute_clip_model_update(theirs, [np.asarray(global_state[k], dtype=np.float64) for k in keys], clipping_norm)
    for k, expected in zip(keys, theirs, strict=True):
        assert ours[k].dtype == torch.float32 and ours[k].shape == update[k].shape
        np.testing.assert_allclose(ours[k].numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [0.3, 5.0, 80.0])
def test_norm_after_clipping_is_min_of_norm_and_clipping_norm(scale):
    clipping_norm = 1.0
    update, global_state = _states(scale, seed=3)
    clipped, _ = clip_state(update, global_state, clipping_norm)
    # float32 storage: relative error of order 1e-7 per element
    assert _delta_norm(clipped, global_state) == pytest.approx(min(scale, clipping_norm), rel=1e-5)
    if scale <= clipping_norm:
        for k in update:
            assert torch.equal(clipped[k], update[k])  # below the bound the update passes untouched


def test_clip_state_leaves_integer_buffers_alone():
    update, global_state = _states(4.0)
    global_state["bn.num_batches_tracked"] = torch.tensor(10, dtype=torch.int64)
    update["bn.num_batches_tracked"] = torch.tensor(25, dtype=torch.int64)
    clipped, norm = clip_state(update, global_state, 1.0)
    assert clipped["bn.num_batches_tracked"].dtype == torch.int64
    assert int(clipped["bn.num_batches_tracked"]) == 25
    assert norm == pytest.approx(4.0, rel=1e-6)  # the norm is over the floating-point tensors


def _files(tmp_path: Path, update, global_state) -> tuple[Path, Path]:
    up, gl = tmp_path / "update.safetensors", tmp_path / "global.safetensors"
    save_state_dict(update, up)
    save_state_dict(global_state, gl)
    return up, gl


@pytest.mark.parametrize("scale", [0.5, 7.0])
def test_server_side_clip_file_equals_client_side_clip_state(tmp_path, scale):
    """Server mode clips the stored update as aggregate does to the same tensors as client mode clips in
    memory; with float tensors only, its norm is the guards' update norm."""
    update, global_state = _states(scale, seed=5)
    up, gl = _files(tmp_path, update, global_state)
    guard = check_update(up, gl, num_examples=1)
    factor, norm = clip_file(up, gl, tmp_path / "clipped.safetensors", 2.0)
    assert norm == pytest.approx(guard.update_norm, rel=1e-9)
    assert factor == pytest.approx(min(1.0, 2.0 / scale), rel=1e-6)
    server = load_state_dict(tmp_path / "clipped.safetensors")
    client, _ = clip_state(update, global_state, 2.0)
    assert set(server) == set(client)
    for k in client:
        assert torch.equal(server[k], client[k]), k
    assert _delta_norm(server, global_state) == pytest.approx(min(scale, 2.0), rel=1e-5)


def test_server_side_clipping_with_an_integer_buffer_matches_client_side(tmp_path):
    """Integer buffers (BatchNorm's num_batches_tracked) are neither counted in the clipped norm nor
    scaled, on both sides (the guards' norm counts them; clipping must not use it)."""
    update, global_state = _states(4.0, seed=7)
    global_state["bn.num_batches_tracked"] = torch.tensor(100, dtype=torch.int64)
    update["bn.num_batches_tracked"] = torch.tensor(160, dtype=torch.int64)  # 60 batches trained
    up, gl = _files(tmp_path, update, global_state)
    guard = check_update(up, gl, num_examples=1)
    factor, norm = clip_file(up, gl, tmp_path / "clipped.safetensors", 1.0)
    assert guard.update_norm > 50 and norm == pytest.approx(4.0, rel=1e-6) and factor == pytest.approx(0.25)
    server = load_state_dict(tmp_path / "clipped.safetensors")
    floats = [k for k in global_state if global_state[k].is_floating_point()]
    # fixed clipping: an update of norm 4 is scaled to norm 1 (clip_state does exactly this)
    assert _delta_norm({k: server[k] for k in floats}, {k: global_state[k] for k in floats}) == pytest.approx(
        1.0, rel=1e-5
    )


def test_clip_file_keeps_dtypes_and_does_not_touch_its_input(tmp_path):
    update, global_state = _states(9.0)
    update["steps"] = torch.tensor([3, 4], dtype=torch.int32)
    global_state["steps"] = torch.tensor([1, 1], dtype=torch.int32)
    update["half"] = torch.ones(4, dtype=torch.float16) * 2
    global_state["half"] = torch.zeros(4, dtype=torch.float16)
    up, gl = _files(tmp_path, update, global_state)
    before = up.read_bytes()
    factor, norm = clip_file(up, gl, tmp_path / "out.safetensors", 1.0)
    assert norm == pytest.approx(math.sqrt(9.0**2 + 4 * 2.0**2), rel=1e-6)
    out = load_state_dict(tmp_path / "out.safetensors")
    assert up.read_bytes() == before
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in update.items()}
    assert torch.equal(out["steps"], update["steps"])
    assert torch.allclose(out["half"].float(), torch.full((4,), 2.0 * factor), atol=1e-3)


# --- Gaussian noise ---------------------------------------------------------------------------------------------


def _zeros(tmp_path: Path, name: str = "model") -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_state_dict({"w": torch.zeros(150, 100), "b": torch.zeros(5000), "count": torch.zeros(3, dtype=torch.int64)},
                    path)
    return path


def test_added_noise_is_gaussian_with_flowers_stddev(tmp_path):
    """30 000 seeded samples: mean, std (chi-square interval) and shape (KS test) of N(0, std²)."""
    std = noise_stddev(noise_multiplier=1.1, clipping_norm=2.0, num_updates=3)
    assert std == compute_stdv(1.1, 2.0, 3)
    path = _zeros(tmp_path)
    add_gaussian_noise(path, std, seed=1234)
    state = load_state_dict(path)
    noise = np.concatenate([state["w"].numpy().ravel(), state["b"].numpy().ravel()]).astype(np.float64)
    n = noise.size
    assert n == 20_000
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], df=n - 1)
    assert lo < (n - 1) * noise.var(ddof=1) / std**2 < hi
    assert stats.kstest(noise / std, "norm").pvalue > 1e-4
    # each tensor gets its own draws
    assert not np.array_equal(state["w"].numpy().ravel()[:100], state["b"].numpy()[:100])
    assert abs(state["w"].numpy().std() - std) < 0.05 * std and abs(state["b"].numpy().std() - std) < 0.05 * std


def test_noise_is_reproducible_per_seed_and_leaves_integers_and_dtypes(tmp_path):
    a, b, c = _zeros(tmp_path, "a"), _zeros(tmp_path, "b"), _zeros(tmp_path, "c")
    add_gaussian_noise(a, 0.5, seed=7)
    add_gaussian_noise(b, 0.5, seed=7)
    add_gaussian_noise(c, 0.5, seed=8)
    sa, sb, sc = load_state_dict(a), load_state_dict(b), load_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["w"], sc["w"])
    assert sa["w"].dtype == torch.float32 and sa["count"].dtype == torch.int64
    assert torch.equal(sa["count"], torch.zeros(3, dtype=torch.int64))


def test_noise_is_added_to_the_model_not_replacing_it(tmp_path):
    path = tmp_path / "m.safetensors"
    base = torch.linspace(-3, 3, 10_000)
    save_state_dict({"w": base}, path)
    add_gaussian_noise(path, 0.01, seed=3)
    diff = load_state_dict(path)["w"].double() - base.double()
    assert abs(float(diff.std()) - 0.01) < 0.001 and abs(float(diff.mean())) < 0.001


def test_zero_noise_multiplier_adds_nothing(tmp_path):
    path = _zeros(tmp_path)
    add_gaussian_noise(path, noise_stddev(0.0, 1.0, 3), seed=1)
    assert all(not bool(v.any()) for v in load_state_dict(path).values())


def test_unseeded_noise_differs_between_calls(tmp_path):
    a, b = _zeros(tmp_path, "a"), _zeros(tmp_path, "b")
    add_gaussian_noise(a, 1.0)
    add_gaussian_noise(b, 1.0)
    assert not torch.equal(load_state_dict(a)["w"], load_state_dict(b)["w"])


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"w": torch.ones(3)}, r"missing \['b'\], unexpected \[\]"),
        ({"w": torch.ones(3), "b": torch.ones(1), "extra": torch.ones(1)}, r"missing \[\], unexpected \['extra'\]"),
        ({"w": torch.ones(1), "b": torch.ones(1)}, r"w \(1,\) \(global \(3,\)\)"),
    ],
)
def test_clip_state_names_tensors_that_differ_from_the_global(update, message):
    global_state = {"w": torch.zeros(3), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=message):
        clip_state(update, global_state, 1.0)
