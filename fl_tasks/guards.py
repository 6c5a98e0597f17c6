"""Update guards: checks an update must pass before it may reach the global model.

Run by the silo-side validate step and again by the aggregator (which must not trust a verdict
written by a silo). Each check streams tensor by tensor; nothing holds two models in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fl_tasks.spec import Guards
from fl_tasks.weights import tensor_specs


@dataclass(frozen=True)
class GuardResult:
    accepted: bool
    reason: str = ""
    update_norm: float | None = None


def check_update(
    update_path: str | Path,
    global_path: str | Path,
    *,
    num_examples: object,
    max_update_norm: float | None = None,
    max_num_examples: int | None = None,
) -> GuardResult:
    """Same keys/shapes/dtypes as the global, all values finite, sane example count, norm bound."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        return GuardResult(False, f"num-examples must be a positive integer, got {num_examples!r}")
    if max_num_examples is not None and num_examples > max_num_examples:
        return GuardResult(
            False, f"num-examples {num_examples} exceeds guards.max_num_examples={max_num_examples}"
        )
    try:
        ours, theirs = tensor_specs(update_path), tensor_specs(global_path)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a rejection reason, not a crash
        return GuardResult(False, f"unreadable safetensors: {exc}")
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing or extra:
        return GuardResult(False, f"keys differ from the global model: missing {missing}, unexpected {extra}")
    for name, (dtype, shape) in theirs.items():
        if ours[name] != (dtype, shape):
            return GuardResult(
                False, f"tensor {name!r} is {ours[name][0]}{list(ours[name][1])}, global is {dtype}{list(shape)}"
            )
    sq = 0.0
    with safe_open(str(update_path), framework="pt") as up, safe_open(str(global_path), framework="pt") as gl:
        for name in theirs:
            tensor = up.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return GuardResult(False, f"tensor {name!r} has non-finite values (NaN or Inf)")
            delta = tensor.double() - gl.get_tensor(name).double()
            sq += float((delta * delta).sum())
    norm = math.sqrt(sq)
    if max_update_norm is not None and norm > max_update_norm:
        return GuardResult(
            False, f"update L2 norm {norm:.4g} exceeds guards.max_update_norm={max_update_norm}", norm
        )
    return GuardResult(True, "", norm)


def check_with_spec_guards(update_path: str | Path, global_path: str | Path, num_examples: object,
                           guards: Guards) -> GuardResult:
    """:func:`check_update` with the bounds from the spec's ``guards`` section (as in plan.json)."""
    return check_update(
        update_path,
        global_path,
        num_examples=num_examples,
        max_update_norm=guards.max_update_norm,
        max_num_examples=guards.max_num_examples,
    )
