"""The global aggregate of a regional round, from partials placed in a real local store: server-side
DP noise is added once (its scale set by every accepted update of every region), robust strategies
combine the regions' aggregates by the spec's rule, and a partial left by another run does not count."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fl_tasks.__main__ import main as step_main
from fl_tasks.aggregation.partials import combine_region_models, write_partial_sum, write_region_model
from fl_tasks.privacy import noise_stddev
from fl_tasks.records import (
    AcceptedUpdate,
    ObjectRef,
    Plan,
    PlanRegion,
    PlanSilo,
    RegionPartial,
    RegistryNames,
    Result,
)
from fl_tasks.regions import REGION_STORE_URL_ENV
from fl_tasks.spec import AcrossRegions, DifferentialPrivacy, Strategy
from fl_tasks.steps.aggregate_regions import RegionQuorumNotMet
from fl_tasks.store import JobKeys, open_store

JOB = "glob"
KEYS = JobKeys(JOB)
REGIONS = {"eu": ["a", "b", "c"], "us": ["d"], "asia": ["e", "f", "g"]}


def setup_round(tmp_path, strategy: Strategy, *, dp=None, across=None, foreign: str | None = None):
    """Round 1's plan, input global and each region's partial in the job's store, as aggregate_region
    leaves them; ``foreign``: that region's partial was left by another run."""
    store = open_store()
    rng = np.random.default_rng(0)
    global_path = tmp_path / "global.safetensors"
    save_file({"w": rng.standard_normal((100, 100)).astype(np.float32)}, str(global_path))
    input_global = ObjectRef(key=KEYS.global_model(1), sha256=store.put_file(KEYS.global_model(1), global_path))
    silos = [s for ss in REGIONS.values() for s in ss]
    store.put_record(KEYS.plan(1), Plan(
        job=JOB, round=1, dag_run_id="run", created_at=1.0, spec_hash="h", client_app="a:b", strategy=strategy,
        registry=RegistryNames(model_name=JOB, experiment=JOB), training={},
        silos=[PlanSilo(name=s, data="x") for s in silos], input_global=input_global, differential_privacy=dp,
        regions=[PlanRegion(name=n, silos=ss) for n, ss in REGIONS.items()], across_regions=across,
    ))
    updates = {}
    for silo in silos:
        path = tmp_path / f"{silo}.safetensors"
        save_file({"w": rng.standard_normal((100, 100)).astype(np.float32)}, str(path))
        updates[silo] = (path, float(rng.integers(10, 500)))
    kind = "sum" if strategy.name == "FedAvg" else "model"
    for name, members in REGIONS.items():
        inputs = [updates[s] for s in members]
        out = tmp_path / f"partial_{name}.safetensors"
        total = write_partial_sum(inputs, out) if kind == "sum" else write_region_model(
            strategy.name, strategy.params, inputs, out)
        key = KEYS.partial(1, name)
        store.put_record(KEYS.partial_record(1, name), RegionPartial(
            job=JOB, round=1, region=name, dag_run_id="other-run" if name == foreign else "run", contributed=True,
            kind=kind, partial=ObjectRef(key=key, sha256=store.put_file(key, out)), total_weight=total,
            accepted={s: AcceptedUpdate(sha256="0" * 64, num_examples=updates[s][1]) for s in members},
            input_global_sha256=input_global.sha256, strategy=strategy.name,
        ))
    return store, updates


def aggregate() -> int:
    return step_main(["aggregate", "--job", JOB, "--round", "1", "--run-id", "run"])


def committed_global(store, tmp_path):
    result = store.get_record(KEYS.result(1), Result)
    store.get_file(result.new_global.key, tmp_path / "new.safetensors", result.new_global.sha256)
    return result, load_file(str(tmp_path / "new.safetensors"))["w"].astype(np.float64)


def test_server_side_dp_noise_is_added_once_over_all_regions(airfed_home, tmp_path):
    dp = DifferentialPrivacy(mode="server", noise_multiplier=2.0, clipping_norm=1.5)
    store, updates = setup_round(tmp_path, Strategy(), dp=dp)
    assert aggregate() == 0
    result, noisy = committed_global(store, tmp_path)
    weights = np.array([w for _p, w in updates.values()])
    stacked = np.stack([load_file(str(p))["w"].astype(np.float64) for p, _w in updates.values()])
    exact = np.tensordot(weights, stacked, axes=1) / weights.sum()
    noise = noisy - exact
    expected = noise_stddev(2.0, 1.5, 7)  # 7 accepted updates across three regions, once
    assert result.differential_privacy == dp and len(result.accepted) == 7
    assert abs(noise.std() / expected - 1) < 0.05, (noise.std(), expected)  # 10 000 draws


@pytest.mark.parametrize("rule", ["FedMedian", "FedAvg"])
def test_robust_strategy_combines_regional_aggregates_by_the_named_rule(airfed_home, tmp_path, rule):
    strategy = Strategy(name="FedMedian").resolved()
    store, _updates = setup_round(tmp_path, strategy, across=AcrossRegions(rule=rule))
    assert aggregate() == 0
    _result, got = committed_global(store, tmp_path)
    models = [
        (tmp_path / f"partial_{n}.safetensors",
         store.get_record(KEYS.partial_record(1, n), RegionPartial).total_weight)
        for n in REGIONS
    ]
    combine_region_models(rule, models, tmp_path / "want.st")
    np.testing.assert_array_equal(got, load_file(str(tmp_path / "want.st"))["w"].astype(np.float64))


def test_a_partial_of_another_run_does_not_count(airfed_home, tmp_path):
    store, _updates = setup_round(tmp_path, Strategy(), across=AcrossRegions(min_regions=3), foreign="us")
    with pytest.raises(RegionQuorumNotMet, match="only 2 region"):
        aggregate()
    result = store.get_record(KEYS.result(1), Result)
    assert not result.committed and "belongs to run other-run" in result.regions["us"].reason
    assert result.rejected["d"] == result.regions["us"].reason
    assert not store.exists(KEYS.head)


def test_a_region_that_is_down_is_recorded_and_the_others_commit(airfed_home, tmp_path, monkeypatch):
    """us's store is unreachable: its aggregator fails, says why in the job's store, and the round
    commits from eu and asia (min_regions 1) naming us as missing."""
    store, _updates = setup_round(tmp_path, Strategy())
    with monkeypatch.context() as m:
        m.setenv(REGION_STORE_URL_ENV, "ftp://us.example/airfed")
        with pytest.raises(ValueError, match="unsupported scheme"):
            step_main(["aggregate_region", "--job", JOB, "--round", "1", "--run-id", "run", "--region", "us"])
    assert aggregate() == 0
    result = store.get_record(KEYS.result(1), Result)
    us = result.regions["us"]
    assert result.committed and not us.contributed and "us: aggregate_region failed: ValueError" in us.reason
    assert sorted(result.accepted) == ["a", "b", "c", "e", "f", "g"] and result.rejected == {"d": us.reason}
