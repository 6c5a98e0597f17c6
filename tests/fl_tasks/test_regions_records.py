"""Records of the regional tier: additive and versioned. A flat job's plan.json and result.json are
written exactly as before (no regional keys, schema_version 2); records with regional fields are
version 3, which this code reads and an older reader refuses by name."""

from __future__ import annotations

import json

import pytest

from fl_tasks import records
from fl_tasks.records import ObjectRef, Plan, PlanRegion, RegionOutcome, RegionPartial, RegistryNames, Result
from fl_tasks.spec import AcrossRegions, Strategy

REF = ObjectRef(key="job/rounds/1/global.safetensors", sha256="a" * 64)


def plan(**extra) -> Plan:
    return Plan(job="job", round=1, dag_run_id="run", created_at=1.0, spec_hash="h", client_app="a:b",
                strategy=Strategy(), registry=RegistryNames(model_name="m", experiment="e"), training={},
                silos=[], input_global=REF, **extra)


def test_flat_records_keep_their_bytes_and_version():
    flat = json.loads(records.dump(plan()))
    assert flat["schema_version"] == 2 and "regions" not in flat and "across_regions" not in flat
    result = Result(job="job", round=1, dag_run_id="run", input_global=REF, new_global=REF, strategy=Strategy())
    dumped = json.loads(records.dump(result))
    assert dumped["schema_version"] == 2 and "regions" not in dumped
    # a version-2 record (what every store holds today) still reads, regional fields absent
    assert records.parse(Plan, records.dump(plan()), "plan.json").regions is None


def test_regional_records_are_version_3_and_round_trip():
    regional = plan(regions=[PlanRegion(name="eu", silos=["a", "b"])], across_regions=AcrossRegions(min_regions=1))
    raw = records.dump(regional)
    assert json.loads(raw)["schema_version"] == 3
    again = records.parse(Plan, raw, "plan.json")
    assert again == regional and again.region_of("b").name == "eu" and records.dump(again) == raw
    result = Result(job="job", round=1, dag_run_id="run", input_global=REF, new_global=REF, strategy=Strategy(),
                    regions={"eu": RegionOutcome(contributed=False, reason="region eu below its quorum")})
    assert json.loads(records.dump(result))["schema_version"] == 3
    partial = RegionPartial(job="job", round=1, region="eu", dag_run_id="run", contributed=True, kind="sum",
                            partial=REF, total_weight=12.0, input_global_sha256="a" * 64, strategy="FedAvg")
    assert records.parse(RegionPartial, records.dump(partial), "eu.json") == partial


def test_a_reader_of_version_2_refuses_regional_records_by_name(monkeypatch):
    raw = records.dump(plan(regions=[PlanRegion(name="eu", silos=["a"])]))
    monkeypatch.setattr(records, "SCHEMA_VERSION", 2)  # the reader before regions existed
    with pytest.raises(records.RecordError, match="schema_version 3 is newer than this airfed reads"):
        records.parse(Plan, raw, "plan.json")
