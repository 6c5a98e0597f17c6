"""Quorum (fl_tasks.spec.Quorum.required) and per-round silo sampling (distribute.sample_silos)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_tasks.spec import Quorum
from fl_tasks.steps.aggregate import required_silos
from fl_tasks.steps.distribute import sample_silos

REPO = Path(__file__).resolve().parents[2]
NAMES = [f"silo-{i:03d}" for i in range(40)]


# --- quorum -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_silos", "min_fraction", "n", "expected"),
    [
        (1, 0.0, 3, 1),
        (1, 0.0, 0, 1),  # never fewer than one accepted update
        (2, 0.0, 3, 2),
        (1, 0.5, 5, 3),  # ceil(2.5)
        (1, 0.5, 4, 2),
        (1, 1.0, 7, 7),
        (4, 0.5, 5, 4),  # the larger of the two
        (2, 0.6, 10, 6),
        (1, 0.01, 500, 5),
        (1, 0.001, 500, 1),  # ceil(0.5)
        (1, 0.25, 1000, 250),
    ],
)
def test_quorum_is_the_larger_of_count_and_fraction(min_silos, min_fraction, n, expected):
    quorum = Quorum(min_silos=min_silos, min_fraction=min_fraction)
    assert quorum.required(n) == expected
    assert required_silos(quorum, n) == expected  # what aggregate enforces


def test_quorum_defaults_to_one():
    assert Quorum().required(1) == Quorum().required(500) == 1


@pytest.mark.parametrize("bad", [{"min_silos": 0}, {"min_fraction": -0.1}, {"min_fraction": 1.5}, {"other": 1}])
def test_quorum_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        Quorum.model_validate(bad)


@pytest.mark.parametrize(("min_fraction", "n", "expected"), [(0.07, 100, 7), (0.14, 50, 7), (0.28, 25, 7)])
def test_quorum_fraction_is_exact_for_decimal_fractions(min_fraction, n, expected):
    assert Quorum(min_fraction=min_fraction).required(n) == expected


# --- sampling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "n", "expected"),
    [(0.5, 4, 2), (0.5, 5, 3), (0.1, 40, 4), (0.11, 40, 5), (0.01, 40, 1), (0.99, 40, 40), (0.25, 3, 1)],
)
def test_sample_size_is_ceil_fraction_times_n(fraction, n, expected):
    assert expected == math.ceil(fraction * n)
    sample = sample_silos(NAMES[:n], fraction, seed=0, job="j", r=1, at_least=1)
    assert len(sample) == expected and len(set(sample)) == expected


@pytest.mark.parametrize(("fraction", "at_least", "expected"), [(0.1, 7, 7), (0.1, 4, 4), (0.1, 3, 4), (0.05, 40, 40)])
def test_sample_is_at_least_the_quorum(fraction, at_least, expected):
    assert len(sample_silos(NAMES, fraction, seed=1, job="j", r=2, at_least=at_least)) == expected


def test_sample_never_exceeds_the_silos():
    assert sample_silos(NAMES[:3], 0.5, seed=0, job="j", r=1, at_least=10) == NAMES[:3]


def test_a_sampled_round_can_always_reach_its_quorum():
    """For every spec-valid quorum (min_silos ≤ N), the sample is at least the quorum it is judged by."""
    for n in (1, 2, 3, 7, 40):
        for fraction in (0.01, 0.2, 0.5, 0.9, 1.0):
            for min_silos in range(1, n + 1):
                for min_fraction in (0.0, 0.5, 1.0):
                    quorum = Quorum(min_silos=min_silos, min_fraction=min_fraction)
                    sample = sample_silos(NAMES[:n], fraction, 3, "j", 1, quorum.min_silos)
                    assert quorum.required(len(sample)) <= len(sample), (n, fraction, quorum)


def test_full_fraction_is_every_silo_in_order_and_a_copy():
    names = ["zeta", "alpha", "mid"]
    sample = sample_silos(names, 1.0, seed=9, job="j", r=1, at_least=1)
    assert sample == names and sample is not names
    sample.append("x")
    assert names == ["zeta", "alpha", "mid"]


def test_sample_keeps_the_spec_order():
    names = [f"s{i}" for i in (9, 3, 7, 1, 5, 0, 8, 2, 6, 4)]  # not sorted
    for r in range(1, 30):
        sample = sample_silos(names, 0.4, seed=2, job="j", r=r, at_least=1)
        assert sample == [n for n in names if n in sample]


def test_sample_is_deterministic_per_seed_job_and_round():
    first = sample_silos(NAMES, 0.25, seed=7, job="digits", r=3, at_least=1)
    assert first == sample_silos(list(NAMES), 0.25, seed=7, job="digits", r=3, at_least=1)
    by_round = {tuple(sample_silos(NAMES, 0.25, 7, "digits", r, 1)) for r in range(1, 21)}
    by_seed = {tuple(sample_silos(NAMES, 0.25, s, "digits", 3, 1)) for s in range(20)}
    by_job = {tuple(sample_silos(NAMES, 0.25, 7, f"job{i}", 3, 1)) for i in range(20)}
    assert len(by_round) > 15 and len(by_seed) > 15 and len(by_job) > 15


def test_every_silo_is_sampled_about_fraction_of_the_rounds():
    counts = dict.fromkeys(NAMES[:10], 0)
    rounds = 400
    for r in range(1, rounds + 1):
        for name in sample_silos(NAMES[:10], 0.3, seed=11, job="j", r=r, at_least=1):
            counts[name] += 1
    # 3 of 10 per round: each silo ~120 times (binomial sd ~9.2)
    assert all(120 - 50 < c < 120 + 50 for c in counts.values()), counts


def test_sample_is_the_same_in_another_process_whatever_its_hash_seed():
    """A retried distribute (another pod, another PYTHONHASHSEED) recomputes the same sample."""
    here = [sample_silos(NAMES, 0.2, seed=5, job="j", r=r, at_least=2) for r in (1, 2, 3)]
    code = (
        "import json; from fl_tasks.steps.distribute import sample_silos; "
        f"names = {NAMES!r}; "
        "print(json.dumps([sample_silos(names, 0.2, seed=5, job='j', r=r, at_least=2) for r in (1, 2, 3)]))"
    )
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True, timeout=60)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize(("fraction", "n", "expected"), [(0.07, 100, 7), (0.14, 50, 7), (0.56, 25, 14)])
def test_sample_size_is_exact_for_decimal_fractions(fraction, n, expected):
    names = [f"s{i}" for i in range(n)]
    assert len(sample_silos(names, fraction, seed=0, job="j", r=1, at_least=1)) == expected
