"""Typed store records: round trips, records written before they were typed, schema errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fl_tasks import records
from fl_tasks.records import (
    Evaluation,
    Head,
    Manifest,
    Plan,
    RecordError,
    RegistrySummary,
    Result,
    TrainStatus,
    Verdict,
)
from fl_tasks.store import ChecksumMismatch, JobKeys, open_store

#: A store written by the code before typed records (two FedAdam rounds, one silo failing to train),
#: JSON records only, as the steps of commit f2eeb65 wrote them (run in-process, like test_offline_cli).
V1_STORE = Path(__file__).parent / "data" / "store_v1"
KEYS = JobKeys("oldjob")


@pytest.fixture
def v1_store(tmp_path):
    shutil.copytree(V1_STORE, tmp_path / "store")
    return open_store(f"file://{tmp_path / 'store'}")


def test_every_record_written_before_typed_records_reads(v1_store):
    head = v1_store.get_record(KEYS.head, Head)
    assert head.round == 2 and head.schema_version == 1
    assert head.server_state is not None and head.server_state.key == "oldjob/rounds/2/server_state.safetensors"
    for r in (1, 2):
        plan = v1_store.get_record(KEYS.plan(r), Plan)
        assert plan.schema_version == 1 and plan.strategy.name == "FedAdam" and plan.sampled_silos == [
            "north", "south", "bad"
        ]
        assert plan.silo("bad").node_config == {"fault": "raise"}
        assert (plan.previous_head is None) == (r == 1)
        result = v1_store.get_record(KEYS.result(r), Result, sha256=None)
        assert result.committed and set(result.accepted) == {"north", "south"}
        assert result.rejected["bad"].startswith("no update: train failed")
        assert v1_store.get_record(KEYS.status(r, "bad"), TrainStatus).state == "failed"
        assert not v1_store.get_record(KEYS.verdict(r, "bad"), Verdict).accepted
        for silo in ("north", "south"):
            manifest = v1_store.get_record(KEYS.manifest(r, silo), Manifest)
            assert isinstance(manifest.num_examples, int) and manifest.num_examples > 0
            assert v1_store.get_record(KEYS.verdict(r, silo), Verdict).update_sha256 == manifest.sha256
            assert "accuracy" in v1_store.get_record(KEYS.evaluation(r, silo), Evaluation).metrics
        assert v1_store.get_record(KEYS.registry(r), RegistrySummary).accepted == ["north", "south"]
    # HEAD's checksum of round 2's result still holds: the bytes are what they were
    v1_store.get_record(KEYS.result(2), Result, sha256=head.result_sha256)


def test_round_trip_is_canonical_and_versioned(v1_store, tmp_path):
    store = open_store(f"file://{tmp_path / 'new'}")
    for key, model in [(KEYS.head, Head), (KEYS.plan(2), Plan), (KEYS.result(2), Result),
                       (KEYS.manifest(1, "north"), Manifest), (KEYS.registry(2), RegistrySummary)]:
        old = v1_store.get_record(key, model)
        fresh = old.model_copy(update={"schema_version": records.SCHEMA_VERSION})
        sha = store.put_record(key, fresh)
        again = store.get_record(key, model, sha256=sha)
        assert again == fresh
        assert store.put_record(key, again) == sha  # canonical bytes: same record, same sha256
        stored = json.loads(store.get_bytes(key))
        assert stored["schema_version"] == records.SCHEMA_VERSION
        # same keys as before, plus the version (and optional fields now written as null)
        assert set(json.loads(v1_store.get_bytes(key))) <= set(stored)


def test_schema_errors_name_the_object_and_the_field(v1_store):
    raw = json.loads(v1_store.get_bytes(KEYS.plan(1)))
    raw["input_global"].pop("sha256")
    raw["strategy"]["name"] = "FedMagic"
    v1_store.put_bytes(KEYS.plan(1), json.dumps(raw).encode())
    with pytest.raises(RecordError) as err:
        v1_store.get_record(KEYS.plan(1), Plan)
    message = str(err.value)
    assert "oldjob/rounds/1/plan.json" in message and "not a valid Plan record" in message
    assert "input_global.sha256: Field required" in message
    assert "strategy.name" in message and "FedMagic" in message


def test_unknown_keys_and_newer_schemas_are_refused(v1_store):
    raw = json.loads(v1_store.get_bytes(KEYS.head))
    v1_store.put_bytes(KEYS.head, json.dumps({**raw, "surprise": 1}).encode())
    with pytest.raises(RecordError, match="surprise: Extra inputs are not permitted"):
        v1_store.get_record(KEYS.head, Head)
    v1_store.put_bytes(KEYS.head, json.dumps({**raw, "schema_version": records.SCHEMA_VERSION + 1}).encode())
    with pytest.raises(RecordError, match="newer than this airfed reads"):
        v1_store.get_record(KEYS.head, Head)
    v1_store.put_bytes(KEYS.head, b"{not json")
    with pytest.raises(RecordError, match="HEAD.json: not valid JSON"):
        v1_store.get_record(KEYS.head, Head)


def test_checksum_is_checked_before_the_schema(v1_store):
    with pytest.raises(ChecksumMismatch):
        v1_store.get_record(KEYS.result(1), Result, sha256="0" * 64)


def test_uncommitted_result_as_written_by_a_failed_quorum(v1_store):
    """The record aggregate wrote when the quorum was not met (before typed records)."""
    plan = json.loads(v1_store.get_bytes(KEYS.plan(2)))
    old = {
        "job": "oldjob", "round": 3, "dag_run_id": "manual__3", "committed": False,
        "reason": "round 3: only 0 accepted update(s) (none), quorum needs 1; HEAD stays at round 2",
        "accepted": {}, "rejected": {"north": "no update: train did not run"}, "input_global": plan["input_global"],
    }
    result = records.parse(Result, json.dumps(old), "result.json")
    assert not result.committed and result.new_global is None and "quorum" in result.reason
    with pytest.raises(RecordError, match="a committed result needs"):
        records.parse(Result, json.dumps({**old, "committed": True}), "result.json")


def test_bad_example_counts_are_kept_for_the_guards_to_judge():
    """A negative or fractional num-examples is a rejection reason, not a record error; a bool is not a count."""
    base = {"job": "j", "round": 1, "silo": "s", "dag_run_id": "d", "key": "k", "sha256": "x", "global_sha256": "g"}
    assert Manifest(**base, num_examples=-5).num_examples == -5
    assert Manifest(**base, num_examples=2.5).num_examples == 2.5
    with pytest.raises(ValueError):
        Manifest(**base, num_examples=True)
