"""Differential privacy as Flower does it: fixed clipping of each update plus Gaussian noise.

``mode: client`` (Flower's DifferentialPrivacyClientSideFixedClipping): each silo's train step
clips its own update before it leaves the silo. ``mode: server`` (…ServerSideFixedClipping): the
aggregator clips every accepted update. Either way the aggregator then adds Gaussian noise with
std = noise_multiplier × clipping_norm / number of aggregated updates to the new global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from fl_tasks.weights import save_state_dict


def noise_stddev(noise_multiplier: float, clipping_norm: float, num_updates: int) -> float:
    return noise_multiplier * clipping_norm / num_updates


def clip_factor(update_norm: float, clipping_norm: float) -> float:
    """Scale of the update (delta from the global) so that its L2 norm is at most clipping_norm."""
    return min(1.0, clipping_norm / update_norm) if update_norm > 0 else 1.0


def clip_state(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
               clipping_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Client side: clip the update in memory; returns (clipped state, original update norm)."""
    check_same_tensors(update, global_state)
    norm = float_update_norm(update, global_state)
    factor = clip_factor(norm, clipping_norm)
    clipped = {
        k: (global_state[k].double() + (v.double() - global_state[k].double()) * factor).to(v.dtype)
        if v.is_floating_point() else v
        for k, v in update.items()
    }
    return clipped, norm


def check_same_tensors(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> None:
    """Clipping measures the update against the global tensor by tensor: a ClientApp that replied with
    other tensor names or shapes gets an error naming them (not a KeyError, nor a broadcast that
    silently changes a shape)."""
    missing = sorted(set(global_state) - set(update))
    unexpected = sorted(set(update) - set(global_state))
    if missing or unexpected:
        raise ValueError(
            f"the update's tensors differ from the global model's: missing {missing}, unexpected {unexpected}"
        )
    reshaped = [f"{k} {tuple(update[k].shape)} (global {tuple(v.shape)})"
                for k, v in global_state.items() if update[k].shape != v.shape]
    if reshaped:
        raise ValueError(f"the update's tensor shapes differ from the global model's: {', '.join(reshaped)}")


def float_update_norm(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the update's floating-point tensors (what clipping scales; integer buffers such as
    BatchNorm's ``num_batches_tracked`` are neither counted nor scaled, on either side)."""
    return math.sqrt(sum(float(((update[k].double() - global_state[k].double()) ** 2).sum())
                         for k in global_state if update[k].is_floating_point()))


def clip_file(update_path: str | Path, global_path: str | Path, out_path: str | Path,
              clipping_norm: float) -> tuple[float, float]:
    """Server side: write the clipped update; returns (clip factor, the update's floating-point norm)."""
    with safe_open(str(update_path), framework="pt") as up, safe_open(str(global_path), framework="pt") as gl:
        update = {name: up.get_tensor(name) for name in up.keys()}
        global_state = {name: gl.get_tensor(name) for name in update}
    clipped, norm = clip_state(update, global_state, clipping_norm)  # the same arithmetic as client side
    save_state_dict(clipped, out_path)
    return clip_factor(norm, clipping_norm), norm


def add_gaussian_noise(path: str | Path, stddev: float, seed: int | None = None) -> None:
    """Add N(0, stddev²) noise to every floating-point tensor of the model at ``path``, in place."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    with safe_open(str(path), framework="pt") as fh:
        state = {name: fh.get_tensor(name) for name in fh.keys()}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            noise = torch.normal(0.0, stddev, size=tensor.shape, generator=generator, dtype=torch.float64)
            state[name] = (tensor.double() + noise).to(tensor.dtype)
    save_state_dict(state, path)
