"""Client sampling (Flower's fraction_train): a seeded sample per round, recorded; others skipped."""

from __future__ import annotations

from helpers import make_fault_spec, store_json
from helpers import run_fault_spec as airfed_run

from fl_tasks.steps.distribute import sample_silos


def test_sample_is_seeded_recorded_and_at_least_the_quorum():
    names = ["a", "b", "c", "d", "e", "f"]
    first = sample_silos(names, 0.5, seed=7, job="j", r=1, at_least=1)
    assert len(first) == 3 and first == sample_silos(names, 0.5, seed=7, job="j", r=1, at_least=1)
    rounds = {tuple(sample_silos(names, 0.5, seed=7, job="j", r=r, at_least=1)) for r in range(1, 20)}
    assert len(rounds) > 1  # a new sample each round
    assert len(sample_silos(names, 0.1, seed=7, job="j", r=1, at_least=4)) == 4
    assert sample_silos(names, 1.0, seed=7, job="j", r=1, at_least=1) == names


def test_unsampled_silos_skip_training_and_the_round_commits(tmp_path):
    home = tmp_path / "home"
    spec = make_fault_spec(
        tmp_path, "sampled", {"a": "", "b": "", "c": "", "d": ""},
        strategy={"name": "FedAvg", "fraction_train": 0.5, "sample_seed": 3},
    )
    proc, summary = airfed_run(home, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = store_json(home, "faulty/rounds/1/plan.json")
    expected = sample_silos(["a", "b", "c", "d"], 0.5, seed=3, job="faulty", r=1, at_least=2)
    assert plan["sampled"] == expected and plan["sampling"] == {"fraction_train": 0.5, "seed": 3}
    result = store_json(home, "faulty/rounds/1/result.json")
    assert sorted(result["accepted"]) == sorted(expected) and result["rejected"] == {}
    for silo in {"a", "b", "c", "d"} - set(expected):
        assert store_json(home, f"faulty/rounds/1/updates/{silo}.json") is None
        # federated evaluation still covers every silo
        assert store_json(home, f"faulty/rounds/1/evaluation/{silo}.json") is not None
    assert summary["rounds"][0]["accepted"] == sorted(expected)
