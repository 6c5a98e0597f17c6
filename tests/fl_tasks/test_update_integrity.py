"""The aggregator trusts no silo's word about what it validated or where its update is.

Rounds of the digits example run in-process (distribute, train, validate per silo), then a silo's
objects are changed the way a buggy or compromised silo process could (its own keys only, which
its store policy allows) before aggregate runs:

- the update replaced after validation, its manifest rewritten to the new bytes' sha256 (so the
  manifest's checksum passes): rejected, because the bytes are not those validate checked;
- a manifest pointing at another silo's update (that silo's sha256 included): rejected.

In both cases the committed global is FedAvg over the other silos' updates only, recomputed here.
After the commit, evaluate and register refuse a result.json that is not the one HEAD records, and
register tags the version with the checksums the aggregator verified.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from round_steps import SILOS, step

from fl_tasks.aggregation import aggregate_files
from fl_tasks.records import Head, Manifest, Result, Verdict
from fl_tasks.store import ChecksumMismatch, JobKeys, open_store, sha256_file
from fl_tasks.weights import load_state_dict, save_state_dict

RUN = "manual__integrity"


def train_round(job: str, validate: bool) -> None:
    assert step("distribute", job, RUN) == 0
    for silo in SILOS:
        assert step("train", job, RUN, 1, silo) == 0
    if validate:
        for silo in SILOS:
            assert step("validate", job, RUN, 1, silo) == 0


def expected_global(store, keys: JobKeys, silos: list[str], into) -> dict[str, torch.Tensor]:
    """FedAvg over ``silos``' stored updates, computed here from their files and manifests."""
    inputs = []
    for silo in silos:
        manifest = store.get_record(keys.manifest(1, silo), Manifest)
        path = into / f"{silo}.safetensors"
        store.get_file(keys.update(1, silo), path, manifest.sha256)
        inputs.append((path, manifest.num_examples))
    global_path = into / "global.safetensors"
    store.get_file(keys.global_model(1), global_path)
    aggregate_files("FedAvg", {}, inputs, into / "expected.safetensors", global_path=global_path)
    return load_state_dict(into / "expected.safetensors")


def committed_global(store, keys: JobKeys, into) -> tuple[Result, dict[str, torch.Tensor]]:
    head = store.get_record(keys.head, Head)
    result = store.get_record(keys.result(1), Result, head.result_sha256)
    store.get_file(head.global_key, into / "committed.safetensors", head.global_sha256)
    return result, load_state_dict(into / "committed.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def validated_update(store, keys: JobKeys, silo: str, into) -> Path:
    path = into / f"{silo}-validated.safetensors"
    store.get_file(keys.update(1, silo), path, store.get_record(keys.manifest(1, silo), Manifest).sha256)
    return path


def test_an_update_replaced_after_validation_is_rejected_and_never_averaged(job, tmp_path):
    train_round(job, validate=True)
    store, keys = open_store(), JobKeys(job)
    verdict = store.get_record(keys.verdict(1, "eu"), Verdict)
    assert verdict.accepted

    # eu's process swaps its validated update for another valid one (all weights scaled), and
    # rewrites its manifest so the manifest's sha256 matches the new bytes
    state = load_state_dict(validated_update(store, keys, "eu", tmp_path))
    tampered = tmp_path / "tampered.safetensors"
    save_state_dict({k: v * 3 if v.is_floating_point() else v for k, v in state.items()}, tampered)
    manifest = store.get_record(keys.manifest(1, "eu"), Manifest)
    new_sha = store.put_file(keys.update(1, "eu"), tampered)
    assert new_sha == sha256_file(tampered) != verdict.update_sha256
    store.put_record(keys.manifest(1, "eu"), manifest.model_copy(update={"sha256": new_sha}))

    assert step("aggregate", job, RUN, 1) == 0
    result, committed = committed_global(store, keys, tmp_path)
    assert sorted(result.accepted) == ["asia", "us"]
    assert result.rejected == {"eu": f"the update changed after validation: validate checked sha256 "
                                     f"{verdict.update_sha256}, the stored update has {new_sha}"}
    assert_same(committed, expected_global(store, keys, ["us", "asia"], tmp_path))


def test_a_manifest_pointing_at_another_silos_update_is_rejected(job, tmp_path):
    train_round(job, validate=False)
    store, keys = open_store(), JobKeys(job)
    us = store.get_record(keys.manifest(1, "us"), Manifest)
    asia = store.get_record(keys.manifest(1, "asia"), Manifest)
    # asia's manifest claims us's update (key and sha256 both us's: every checksum passes)
    store.put_record(keys.manifest(1, "asia"), asia.model_copy(update={"key": us.key, "sha256": us.sha256}))

    assert step("aggregate", job, RUN, 1) == 0
    result, committed = committed_global(store, keys, tmp_path)
    assert sorted(result.accepted) == ["eu", "us"]
    assert result.rejected == {"asia": f"the manifest names {us.key} as the update, not the silo's own "
                                       f"{keys.update(1, 'asia')}"}
    assert_same(committed, expected_global(store, keys, ["us", "eu"], tmp_path))


def test_a_verdict_of_another_run_says_nothing_about_this_update(job, tmp_path):
    """A verdict left by an earlier run's attempt at the round (another sha256) is not this update's."""
    train_round(job, validate=False)
    store, keys = open_store(), JobKeys(job)
    stale = Verdict(job=job, round=1, silo="eu", dag_run_id="manual__earlier", accepted=True,
                    update_sha256="0" * 64)
    store.put_record(keys.verdict(1, "eu"), stale)
    assert step("aggregate", job, RUN, 1) == 0
    result, _ = committed_global(store, keys, tmp_path)
    assert sorted(result.accepted) == sorted(SILOS) and result.rejected == {}


def test_evaluate_and_register_check_the_result_and_record_what_the_aggregator_verified(job, tmp_path):
    """evaluate and register check result.json against HEAD's sha256; register tags the registered
    version with the update checksums of result.json, not with what a silo's manifest says later."""
    from fl_tasks import lineage

    train_round(job, validate=False)
    assert step("aggregate", job, RUN, 1) == 0
    store, keys = open_store(), JobKeys(job)
    result, _ = committed_global(store, keys, tmp_path)

    committed_bytes = store.get_bytes(keys.result(1))
    store.put_record(keys.result(1), result.model_copy(update={"rejected": {"eu": "forged"}}))
    for name, silo in (("evaluate", "us"), ("register", None)):
        with pytest.raises(ChecksumMismatch, match=r"result\.json"):
            step(name, job, RUN, 1, silo)
    store.put_bytes(keys.result(1), committed_bytes)

    for silo in SILOS:
        assert step("evaluate", job, RUN, 1, silo) == 0
    us = store.get_record(keys.manifest(1, "us"), Manifest)
    store.put_record(keys.manifest(1, "us"), us.model_copy(update={"sha256": "f" * 64}))
    assert step("register", job, RUN, 1) == 0
    (version,) = lineage.client().search_model_versions("name = 'digits-mlp'")
    assert {k: v for k, v in version.tags.items() if k.startswith("update_sha256.")} == {
        f"update_sha256.{n}": a.sha256 for n, a in result.accepted.items()}
