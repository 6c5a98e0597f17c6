"""Update guards (fl_tasks/guards.py) on real safetensors files: every rejection reason, and acceptance.

The checksum guard lives in the store (``get_file`` verifies the sha256 recorded where the object is
referenced, as validate and aggregate fetch every update); it is tested here beside the others.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_tasks.guards import GuardResult, check_update, check_with_spec_guards
from fl_tasks.spec import Guards
from fl_tasks.store import ChecksumMismatch, open_store
from fl_tasks.weights import save_state_dict


def _global_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(4, 3, generator=gen),
        "fc.bias": torch.randn(4, generator=gen),
    }


@pytest.fixture
def global_path(tmp_path: Path) -> Path:
    path = tmp_path / "global.safetensors"
    save_state_dict(_global_state(), path)
    return path


def _write(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "update") -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_state_dict(state, path)
    return path


def _shifted(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global plus ``delta`` (zeros where ``delta`` names no tensor)."""
    return {k: v + delta.get(k, torch.zeros_like(v)) for k, v in _global_state().items()}


def _rejected(result: GuardResult, *fragments: str) -> None:
    assert isinstance(result, GuardResult)
    assert not result.accepted, result
    for fragment in fragments:
        assert fragment in result.reason, (fragment, result.reason)


# --- accepted ---------------------------------------------------------------------------------------------------


def test_an_honest_update_is_accepted_with_its_exact_l2_distance(tmp_path, global_path):
    gen = torch.Generator().manual_seed(1)
    delta = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in _global_state().items()}
    update = _write(tmp_path, _shifted(delta))
    result = check_update(update, global_path, num_examples=120)
    assert result.accepted and result.reason == ""
    # the norm is the distance of the stored float32 tensors, computed independently in float64
    stored = {k: np.asarray(v, dtype=np.float64) for k, v in _shifted(delta).items()}
    base = {k: np.asarray(v, dtype=np.float64) for k, v in _global_state().items()}
    expected = math.sqrt(sum(float(((stored[k] - base[k]) ** 2).sum()) for k in base))
    assert result.update_norm == pytest.approx(expected, rel=1e-12)


def test_the_global_itself_is_an_update_of_norm_zero(global_path):
    result = check_update(global_path, global_path, num_examples=1, max_update_norm=1e-9, max_num_examples=1)
    assert result == GuardResult(True, "", 0.0)


# --- num-examples -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 1.5, 10.0, True, None, "10", float("nan")])
def test_num_examples_must_be_a_positive_integer(global_path, bad):
    _rejected(check_update(global_path, global_path, num_examples=bad), "num-examples must be a positive integer",
              repr(bad))


def test_num_examples_bound_is_inclusive(global_path):
    assert check_update(global_path, global_path, num_examples=500, max_num_examples=500).accepted
    _rejected(
        check_update(global_path, global_path, num_examples=501, max_num_examples=500),
        "num-examples 501 exceeds guards.max_num_examples=500",
    )


# --- the file ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\xff" * 64])
def test_an_unreadable_file_is_a_rejection_not_a_crash(tmp_path, global_path, content):
    update = tmp_path / "corrupt.safetensors"
    update.write_bytes(content)
    _rejected(check_update(update, global_path, num_examples=10), "unreadable safetensors")


def test_a_truncated_file_is_rejected(tmp_path, global_path):
    good = _write(tmp_path, _global_state())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-8])
    assert not check_update(truncated, global_path, num_examples=10).accepted


def test_a_missing_file_is_rejected(tmp_path, global_path):
    _rejected(check_update(tmp_path / "absent.safetensors", global_path, num_examples=10), "unreadable safetensors")


# --- keys, shapes, dtypes ---------------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_named(tmp_path, global_path):
    state = _global_state()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    _rejected(
        check_update(_write(tmp_path, state), global_path, num_examples=10),
        "keys differ from the global model", "missing ['fc.bias']", "unexpected ['extra.weight']",
    )


def test_only_missing_keys(tmp_path, global_path):
    state = _global_state()
    del state["fc.weight"]
    _rejected(check_update(_write(tmp_path, state), global_path, num_examples=10),
              "missing ['fc.weight']", "unexpected []")


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, global_path):
    state = _global_state()
    state["fc.weight"] = torch.zeros(3, 4)  # transposed
    _rejected(check_update(_write(tmp_path, state), global_path, num_examples=10),
              "'fc.weight'", "[3, 4]", "[4, 3]")


def test_a_dtype_mismatch_names_the_tensor_and_both_dtypes(tmp_path, global_path):
    state = _global_state()
    state["fc.bias"] = state["fc.bias"].to(torch.float16)
    _rejected(check_update(_write(tmp_path, state), global_path, num_examples=10),
              "'fc.bias'", "F16", "F32")


# --- finite values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(tmp_path, global_path, value):
    state = _global_state()
    state["fc.weight"][2, 1] = value
    result = check_update(_write(tmp_path, state), global_path, num_examples=10, max_update_norm=1e9)
    _rejected(result, "'fc.weight'", "non-finite")


def test_non_finite_half_precision_values_are_rejected(tmp_path):
    base = {"w": torch.zeros(8, dtype=torch.bfloat16)}
    bad = {"w": torch.tensor([0, 0, 0, float("inf"), 0, 0, 0, 0], dtype=torch.bfloat16)}
    _rejected(check_update(_write(tmp_path, bad), _write(tmp_path, base, "g"), num_examples=1), "non-finite")


def test_integer_tensors_pass_the_finite_check(tmp_path):
    base = {"w": torch.zeros(3), "steps": torch.tensor(7, dtype=torch.int64)}
    update = {"w": torch.ones(3), "steps": torch.tensor(7, dtype=torch.int64)}
    result = check_update(_write(tmp_path, update), _write(tmp_path, base, "g"), num_examples=3)
    assert result.accepted and result.update_norm == pytest.approx(math.sqrt(3))


# --- norm bound -------------------------------------------------------------------------------------------------


def _norm_five(tmp_path: Path) -> Path:
    """An update whose distance from the global is exactly 5 (a 3-4-5 step in float32)."""
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0, 0.0])}
    _write(tmp_path, base, "g5")
    return _write(tmp_path, update, "u5")


def test_norm_bound_is_inclusive(tmp_path):
    update = _norm_five(tmp_path)
    result = check_update(update, tmp_path / "g5.safetensors", num_examples=1, max_update_norm=5.0)
    assert result == GuardResult(True, "", 5.0)


def test_norm_above_the_bound_is_rejected_and_reports_the_norm(tmp_path):
    update = _norm_five(tmp_path)
    result = check_update(update, tmp_path / "g5.safetensors", num_examples=1, max_update_norm=4.5)
    _rejected(result, "update L2 norm 5 exceeds guards.max_update_norm=4.5")
    assert result.update_norm == 5.0


def test_without_a_bound_any_finite_norm_passes(tmp_path, global_path):
    huge = _write(tmp_path, _shifted({"fc.weight": torch.full((4, 3), 1e6)}))
    result = check_update(huge, global_path, num_examples=1)
    assert result.accepted and result.update_norm == pytest.approx(1e6 * math.sqrt(12), rel=1e-6)


def test_the_order_of_checks_reports_the_first_failure(tmp_path, global_path):
    """A bad count is reported before the file is opened; shapes before values; values before the norm."""
    assert "num-examples" in check_update(tmp_path / "absent", global_path, num_examples=0).reason
    state = _global_state()
    state["fc.weight"] = torch.full((3, 4), float("nan"))
    assert "is F32[3, 4]" in check_update(_write(tmp_path, state), global_path, num_examples=1).reason
    state = _global_state()
    state["fc.bias"][0] = float("nan")
    reason = check_update(_write(tmp_path, state), global_path, num_examples=1, max_update_norm=1e-9).reason
    assert "non-finite" in reason


# --- the spec's guards section ----------------------------------------------------------------------------------


def test_spec_guards_apply_both_bounds(tmp_path):
    update, base = _norm_five(tmp_path), tmp_path / "g5.safetensors"
    assert check_with_spec_guards(update, base, 10, Guards()).accepted
    assert check_with_spec_guards(update, base, 10, Guards(max_update_norm=5, max_num_examples=10)).accepted
    _rejected(check_with_spec_guards(update, base, 10, Guards(max_update_norm=4)), "max_update_norm=4")
    _rejected(check_with_spec_guards(update, base, 11, Guards(max_num_examples=10)), "max_num_examples=10")


def test_spec_guards_parse_from_plan_json_shape():
    guards = Guards.model_validate({"max_update_norm": 2.5, "max_num_examples": 1000})
    assert (guards.max_update_norm, guards.max_num_examples) == (2.5, 1000)
    with pytest.raises(ValueError):
        Guards.model_validate({"max_update_norm": 0})
    with pytest.raises(ValueError):
        Guards.model_validate({"max_num_examples": 0})


# --- checksum ---------------------------------------------------------------------------------------------------


def test_checksum_is_verified_when_an_update_is_read(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    store.prepare()
    sha = store.put_file("job/rounds/1/updates/us.safetensors", _write(tmp_path, _global_state()))
    good = tmp_path / "good.safetensors"
    store.get_file("job/rounds/1/updates/us.safetensors", good, sha)
    assert good.exists()

    dest = tmp_path / "fetched.safetensors"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as info:
        store.get_file("job/rounds/1/updates/us.safetensors", dest, wrong)
    assert info.value.expected == wrong and info.value.actual == sha
    assert "us.safetensors" in str(info.value)
    assert not dest.exists()  # a mismatching object never reaches the guards


def test_an_object_changed_after_it_was_recorded_fails_its_checksum(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    store.prepare()
    key = "job/rounds/1/updates/eu.safetensors"
    sha = store.put_file(key, _write(tmp_path, _global_state()))
    # a silo (or anyone with write access) swaps the object after the manifest recorded its sha256
    store.put_file(key, _write(tmp_path, _shifted({"fc.bias": torch.ones(4)}), "swapped"))
    with pytest.raises(ChecksumMismatch):
        store.get_file(key, tmp_path / "x.safetensors", sha)
