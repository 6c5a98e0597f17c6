"""The local store: layout, checksums checked on read, atomic writes."""

from __future__ import annotations

import hashlib

import pytest

from fl_tasks.store import ChecksumMismatch, ObjectMissing, open_store


def test_round_trip_and_checksum(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    src = tmp_path / "blob.bin"
    src.write_bytes(b"x" * 100_000)
    sha = store.put_file("job/rounds/1/global.safetensors", src)
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "copy.bin"
    assert store.get_file("job/rounds/1/global.safetensors", dest, sha) == sha
    assert dest.read_bytes() == src.read_bytes()
    assert store.list("job") == ["job/rounds/1/global.safetensors"]


def test_tampered_object_is_never_used(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    src = tmp_path / "blob.bin"
    src.write_bytes(b"original")
    sha = store.put_file("job/u.safetensors", src)
    (tmp_path / "store" / "job" / "u.safetensors").write_bytes(b"tampered")
    dest = tmp_path / "copy.bin"
    with pytest.raises(ChecksumMismatch, match="job/u.safetensors"):
        store.get_file("job/u.safetensors", dest, sha)
    assert not dest.exists()


def test_missing_and_escaping_keys(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(ObjectMissing):
        store.get_json("job/HEAD.json")
    assert store.get_json_or_none("job/HEAD.json") is None
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("../outside", b"x")


def test_unsupported_url():
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_store("ftp://host/x")
