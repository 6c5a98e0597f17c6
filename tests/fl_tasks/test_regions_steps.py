"""The regional tier's steps in-process on the six-silo digits example (dags/digits_regions.yaml):
updates stay in their region's store, the global equals flat FedAvg over the same accepted updates,
a region that is down is recorded (result.json, MLflow) and the global quorum of regions decides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from round_steps import REPO
from safetensors.numpy import load_file

from fl_tasks import audit, commit, prepare_data
from fl_tasks.__main__ import main as step_main
from fl_tasks.aggregation import aggregate_files
from fl_tasks.contract import SPEC_ENV
from fl_tasks.records import Head, Manifest, RegionPartial, Result
from fl_tasks.regions import REGION_STORE_URL_ENV, region_stores, silos_of
from fl_tasks.spec import AcrossRegions, JobSpec
from fl_tasks.steps.aggregate_regions import RegionQuorumNotMet
from fl_tasks.steps.register import RoundNotCommitted
from fl_tasks.store import JobKeys, open_store


@pytest.fixture
def regional(airfed_home: Path, monkeypatch: pytest.MonkeyPatch) -> JobSpec:
    from airfed.spec import load_spec

    spec = load_spec(REPO / "dags" / "digits_regions.yaml")
    # us keeps its objects in the job's store (no `store:`); eu and asia have their own directories
    us = spec.regions[0].model_copy(update={"store": None})
    spec = spec.model_copy(update={"training": {**spec.training, "local-epochs": 1},
                                   "regions": [us, *spec.regions[1:]]})
    payload = spec.step_payload()
    assert prepare_data.main([payload]) == 0
    monkeypatch.setenv(SPEC_ENV, payload)
    monkeypatch.delenv(commit.WAIT_ENV, raising=False)
    monkeypatch.delenv(REGION_STORE_URL_ENV, raising=False)
    return spec


def region_url(home: Path, region: str) -> str | None:
    """The region's own store (None: us, which shares the job's store)."""
    return None if region == "us" else f"file://{home / 'regions' / region}"


def run_step(monkeypatch, step: str, job: str, run_id: str, r: int | str, *, silo: str | None = None,
             region: str | None = None, store: str | None = None, region_store: str | None = None) -> int:
    """One step as its StepCall runs it: the silo steps of a region see only their region's store."""
    with monkeypatch.context() as m:
        if store:
            m.setenv("AIRFED_STORE_URL", store)
        if region_store:
            m.setenv(REGION_STORE_URL_ENV, region_store)
        argv = [step, "--job", job, "--round", str(r), "--run-id", run_id]
        argv += ["--silo", silo] if silo else []
        argv += ["--region", region] if region else []
        return step_main(argv)


def run_round(monkeypatch, spec: JobSpec, home: Path, run_id: str, *, down: tuple[str, ...] = ()) -> int:
    """distribute → regional tier → aggregate; the regions in ``down`` train nothing. Returns the round."""
    assert run_step(monkeypatch, "distribute", spec.job, run_id, "next") == 0
    r = open_store().get_record(JobKeys(spec.job).head, Head).round + 1 if open_store().exists(
        JobKeys(spec.job).head) else 1
    for region in spec.regions:
        url = region_url(home, region.name)
        run_step(monkeypatch, "distribute_region", spec.job, run_id, r, region=region.name, region_store=url)
        if region.name not in down:
            for silo in silos_of(spec, region.name):
                for step in ("train", "validate"):
                    assert run_step(monkeypatch, step, spec.job, run_id, r, silo=silo.name, store=url) == 0
        assert run_step(monkeypatch, "aggregate_region", spec.job, run_id, r, region=region.name,
                        region_store=url) == 0
    return r


def finish_round(monkeypatch, spec: JobSpec, home: Path, run_id: str, r: int) -> None:
    for region in spec.regions:
        url = region_url(home, region.name)
        run_step(monkeypatch, "publish_region", spec.job, run_id, r, region=region.name, region_store=url)
        for silo in silos_of(spec, region.name):
            run_step(monkeypatch, "evaluate", spec.job, run_id, r, silo=silo.name, store=url)
        run_step(monkeypatch, "collect_region", spec.job, run_id, r, region=region.name, region_store=url)
    assert run_step(monkeypatch, "register", spec.job, run_id, r) == 0


def test_regional_rounds_keep_updates_home_and_equal_flat_fedavg(regional, airfed_home, monkeypatch):
    spec, home = regional, airfed_home
    keys = JobKeys(spec.job)
    job_store = open_store()

    # round 1: every region contributes
    r = run_round(monkeypatch, spec, home, "run-1")
    aggregate = step_main(["aggregate", "--job", spec.job, "--round", str(r), "--run-id", "run-1"])
    assert aggregate == 0
    result = job_store.get_record(keys.result(r), Result)
    assert result.committed and result.schema_version == 3 and set(result.regions or {}) == {"us", "eu", "asia"}
    assert sorted(result.accepted) == sorted(s.name for s in spec.silos)

    # no update object outside its region's store; of eu's and asia's, the job's store holds only partials
    for region in spec.regions:
        region_store = open_store(region_url(home, region.name))  # us: the job's store
        for silo in spec.silos:
            assert region_store.exists(keys.update(r, silo.name)) == (silo.region == region.name)
            assert job_store.exists(keys.update(r, silo.name)) == (silo.region == "us")
        outcome = result.regions[region.name]
        record = job_store.get_record(outcome.record.key, RegionPartial, sha256=outcome.record.sha256)
        assert record.partial == outcome.partial and record.total_weight == outcome.total_weight
        assert outcome.total_weight == sum(result.accepted[s].num_examples for s in outcome.accepted)

    # the committed global equals flat FedAvg over the same updates (read where they live)
    inputs = []
    for name, accepted in sorted(result.accepted.items()):
        silo_store = open_store(region_url(home, next(s.region for s in spec.silos if s.name == name)))
        manifest = silo_store.get_record(keys.manifest(r, name), Manifest)
        path = home / f"{name}.safetensors"
        silo_store.get_file(manifest.key, path, accepted.sha256)
        inputs.append((path, accepted.num_examples))
    aggregate_files("FedAvg", {}, inputs, home / "flat.safetensors")
    flat = load_file(str(home / "flat.safetensors"))
    job_store.get_file(result.new_global.key, home / "two_level.safetensors", result.new_global.sha256)
    two_level = load_file(str(home / "two_level.safetensors"))
    for key, value in flat.items():
        np.testing.assert_allclose(two_level[key], value, rtol=1e-6, atol=1e-6 * float(np.abs(value).max()))
    finish_round(monkeypatch, spec, home, "run-1", r)

    # round 2: asia is down entirely; the round commits from us and eu (min_regions 2)
    r = run_round(monkeypatch, spec, home, "run-2", down=("asia",))
    assert step_main(["aggregate", "--job", spec.job, "--round", str(r), "--run-id", "run-2"]) == 0
    result = job_store.get_record(keys.result(r), Result)
    asia = result.regions["asia"]
    assert result.committed and not asia.contributed and "below its quorum" in asia.reason
    assert {s for s in result.rejected} == {"asia-tokyo", "asia-seoul"}
    assert job_store.get_record(keys.head, Head).round == r
    # a retry of the global aggregate is idempotent: same result, HEAD unchanged
    sha = job_store.get_record(keys.head, Head).result_sha256
    assert step_main(["aggregate", "--job", spec.job, "--round", str(r), "--run-id", "run-2"]) == 0
    assert job_store.get_record(keys.head, Head).result_sha256 == sha
    finish_round(monkeypatch, spec, home, "run-2", r)
    run = MlflowClient().get_run(
        job_store.get_json(keys.registry(r))["mlflow_run_id"])
    assert "below its quorum" in run.data.tags["region.asia.missing"]
    assert run.data.tags["regions.missing"] == "asia"
    assert run.data.tags["region.eu.partial_sha256"] == result.regions["eu"].partial.sha256
    assert run.data.metrics["region.us.accepted"] == 2

    # round 3 with a global quorum of three regions: asia still down, nothing moves
    strict = spec.model_copy(update={"across_regions": AcrossRegions(min_regions=3)})
    monkeypatch.setenv(SPEC_ENV, strict.step_payload())
    r = run_round(monkeypatch, strict, home, "run-3", down=("asia",))
    with pytest.raises(RegionQuorumNotMet, match="min_regions needs 3"):
        step_main(["aggregate", "--job", spec.job, "--round", str(r), "--run-id", "run-3"])
    assert job_store.get_record(keys.head, Head).round == r - 1
    uncommitted = job_store.get_record(keys.result(r), Result)
    assert not uncommitted.committed and "asia" in uncommitted.reason
    with pytest.raises(RoundNotCommitted):
        step_main(["register", "--job", spec.job, "--round", str(r), "--run-id", "run-3"])

    # airfed verify recomputes both levels; a mismatch names the region and the key
    stores = region_stores(spec, job_store)
    lines: list[str] = []
    report = audit.Report(lines.append)
    assert audit.verify_job(job_store, spec.job, report, all_rounds=True, region_stores=stores) == [1, 2]
    assert report.failures == 0, "\n".join(lines)
    assert any("region eu: partial over eu-berlin, eu-paris: reproduces the forwarded partial" in ln for ln in lines)
    exact = "FedAvg over the partials of asia, eu, us: reproduces the committed global (sha256 equal)"
    assert any(exact in ln for ln in lines)
    assert any("region asia: contributed nothing: region asia below its quorum" in ln for ln in lines)
    update_key = keys.update(1, "eu-paris")
    stores["eu"].put_bytes(update_key, stores["eu"].get_bytes(update_key)[:-4] + b"\0\0\0\0")
    lines.clear()
    report = audit.Report(lines.append)
    audit.verify_job(job_store, spec.job, report, round_number=1, region_stores=stores)
    assert report.failures == 1
    assert any(ln.startswith(f"FAIL  {update_key}: region eu: update of eu-paris: stored object has sha256")
               for ln in lines), lines


def test_the_regions_read_the_committed_result_against_head(regional, airfed_home, monkeypatch):
    """publish_region reads result.json against HEAD's sha256 in the job's store and copies HEAD down
    with it, so evaluate in a region with a store of its own checks the result it reads there too."""
    from fl_tasks.store import ChecksumMismatch

    spec, home = regional, airfed_home
    keys = JobKeys(spec.job)
    r = run_round(monkeypatch, spec, home, "run-1")
    assert step_main(["aggregate", "--job", spec.job, "--round", str(r), "--run-id", "run-1"]) == 0
    job_store, eu = open_store(), open_store(region_url(home, "eu"))
    committed = job_store.get_bytes(keys.result(r))
    forged = job_store.get_record(keys.result(r), Result).model_copy(update={"rejected": {"eu-berlin": "forged"}})

    job_store.put_record(keys.result(r), forged)
    with pytest.raises(ChecksumMismatch, match=r"result\.json"):
        run_step(monkeypatch, "publish_region", spec.job, "run-1", r, region="eu", region_store=region_url(home, "eu"))
    job_store.put_bytes(keys.result(r), committed)
    assert run_step(monkeypatch, "publish_region", spec.job, "run-1", r, region="eu",
                    region_store=region_url(home, "eu")) == 0
    assert eu.get_bytes(keys.head) == job_store.get_bytes(keys.head)

    eu.put_record(keys.result(r), forged)  # swapped in the region's store after publishing
    with pytest.raises(ChecksumMismatch, match=r"result\.json"):
        run_step(monkeypatch, "evaluate", spec.job, "run-1", r, silo="eu-berlin", store=region_url(home, "eu"))
    eu.put_bytes(keys.result(r), committed)
    assert run_step(monkeypatch, "evaluate", spec.job, "run-1", r, silo="eu-berlin", store=region_url(home, "eu")) == 0
