"""Conditional writes (``create`` / ``replace_if``) on both stores, against a real S3 server (moto on
loopback) and the local directory, including real races of threads and processes on one key."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest
from s3_server import s3_endpoint, s3_store_url  # noqa: F401

from fl_tasks.store import ObjectMissing, PreconditionFailed, Store, StoreError, open_store
from fl_tasks.store.base import sha256_bytes


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_store_url")


@pytest.fixture
def store(store_url: str) -> Store:
    st = open_store(store_url)
    st.prepare()
    return st


def test_create_only_once(store: Store) -> None:
    key = "job/rounds/1/plan.json"
    assert store.create(key, b'{"run": "a"}') == sha256_bytes(b'{"run": "a"}')
    with pytest.raises(PreconditionFailed, match="already exists") as info:
        store.create(key, b'{"run": "b"}')
    assert isinstance(info.value, StoreError) and info.value.key == key
    assert store.get_bytes(key) == b'{"run": "a"}'
    # a retried create whose first attempt landed: same bytes, success
    assert store.create(key, b'{"run": "a"}') == sha256_bytes(b'{"run": "a"}')
    assert store.list("job") == [key]  # no temporary or lock files visible


def test_replace_if_version(store: Store) -> None:
    key = "job/HEAD.json"
    with pytest.raises(ObjectMissing):
        store.get_versioned(key)
    store.create(key, b"round 1")
    data, v1 = store.get_versioned(key)
    assert data == b"round 1"
    store.replace_if(key, b"round 2", v1)
    data, v2 = store.get_versioned(key)
    assert data == b"round 2" and v2 != v1
    with pytest.raises(PreconditionFailed, match="changed"):
        store.replace_if(key, b"round 2 from a stale writer", v1)
    assert store.get_bytes(key) == b"round 2"
    assert store.replace_if(key, b"round 2", v1) == sha256_bytes(b"round 2")  # already there: a landed retry
    with pytest.raises(PreconditionFailed):
        store.replace_if("job/missing.json", b"x", v1)
    assert not store.exists("job/missing.json")
    assert store.list("job") == [key]


def test_records_round_trip(store: Store) -> None:
    from fl_tasks.records import TrainStatus

    rec = TrainStatus(silo="us", round=1, dag_run_id="a", state="failed", reason="x")
    sha = store.create_record("job/s.json", rec)
    got, version, got_sha = store.get_record_versioned("job/s.json", TrainStatus)
    assert got == rec and got_sha == sha
    store.replace_record_if("job/s.json", rec.model_copy(update={"reason": "y"}), version)
    assert store.get_record("job/s.json", TrainStatus).reason == "y"


def _race_threads(store: Store, n: int, attempt) -> list[int]:
    barrier = threading.Barrier(n)
    winners: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            attempt(i)
            winners.append(i)
        except PreconditionFailed:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return winners


@pytest.mark.parametrize("attempt", range(3))
def test_create_race_threads(store: Store, attempt: int) -> None:
    key = f"job/rounds/{attempt}/result.json"
    winners = _race_threads(store, 8, lambda i: store.create(key, f"writer {i}".encode()))
    assert len(winners) == 1
    assert store.get_bytes(key) == f"writer {winners[0]}".encode()


@pytest.mark.parametrize("attempt", range(3))
def test_replace_if_race_threads(store: Store, attempt: int) -> None:
    key = f"job{attempt}/HEAD.json"
    store.create(key, b"round 1")
    _, version = store.get_versioned(key)
    winners = _race_threads(store, 8, lambda i: store.replace_if(key, f"round 2 by {i}".encode(), version))
    assert len(winners) == 1
    assert store.get_bytes(key) == f"round 2 by {winners[0]}".encode()


def _process_writer(url: str, env: dict[str, str], key: str, i: int, start, out) -> None:
    os.environ.update(env)
    store = open_store(url)
    start.wait()
    try:
        store.create(key, f"process {i}".encode())
        out.put(i)
    except PreconditionFailed:
        out.put(-1)


def test_create_race_processes(store_url: str, store: Store) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    key = "job/rounds/1/plan.json"
    procs = [ctx.Process(target=_process_writer, args=(store_url, env, key, i, start, out)) for i in range(4)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    winners = [i for i in results if i >= 0]
    assert len(winners) == 1, results
    assert store.get_bytes(key) == f"process {winners[0]}".encode()
