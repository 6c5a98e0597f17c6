"""The S3/MinIO store against a real S3 server on loopback (moto), and the shared store contract.

No mocks of the client: faults are injected by a TCP proxy in front of the server that resets
connections, answers ``503 SlowDown`` or cuts a response in the middle.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from minio import Minio
from minio.error import S3Error, ServerError
from s3_server import s3_endpoint, s3_store_url  # noqa: F401
from safetensors.numpy import load_file, save_file
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

from fl_tasks.store import ChecksumMismatch, JobKeys, ObjectMissing, Store, StoreError, open_store
from fl_tasks.store.base import json_bytes, sha256_bytes
from fl_tasks.store.local import LocalStore
from fl_tasks.store.s3 import PART_SIZE, S3Store, parse_endpoint

FAST = {"retries": 1, "backoff": 0.01}


# -- helpers ---------------------------------------------------------------------------------------
def raw_client() -> Minio:
    """A plain minio client on the test server (env set by the ``s3_store_url`` fixture)."""
    netloc, secure, _ = parse_endpoint(os.environ["AWS_ENDPOINT_URL"])
    return Minio(
        netloc,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        secure=secure,
        region="us-east-1",
    )


def bucket_of(url: str) -> str:
    return urllib.parse.urlparse(url).netloc


def tamper(store: Store, key: str, data: bytes, metadata: dict | None = None) -> None:
    """Overwrite an object behind the store's back."""
    if isinstance(store, LocalStore):
        (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        name = f"{store.prefix}/{key}"
        raw_client().put_object(store.bucket, name, io.BytesIO(data), len(data), metadata=metadata)


def write_safetensors(path: Path, seed: int = 0, n: int = 300_000) -> bytes:
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((n,)).astype(np.float32), "b": np.arange(7, dtype=np.int64)}, path)
    return path.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset(sock: socket.socket) -> None:
    """Drop the connection abruptly (RST), as a crashed peer or a middlebox would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def _hang_up(sock: socket.socket) -> None:
    """End the connection after the bytes already sent (FIN, so the peer reads them all first).

    ``shutdown`` also wakes the pump thread blocked in ``recv`` on this socket."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><Resource>/</Resource>"
    b"<RequestId>fault-proxy</RequestId></Error>"
)
SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n\r\n".encode()
    + SLOWDOWN_BODY
)
METHODS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ")


class FaultProxy:
    """TCP proxy in front of the S3 server that breaks new connections on demand."""

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.reset_next = 0  # reset this many new connections after they send their request
        self.slowdown_next = 0  # answer this many new connections with 503 SlowDown
        self.cut_after: int | None = None  # end the next response stream after this many bytes
        self.before_cut: Callable[[], None] | None = None  # runs just before that stream is cut
        self.requests: list[str] = []  # request heads forwarded upstream
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _take(self, attr: str) -> bool:
        with self.lock:
            n = getattr(self, attr)
            if n:
                setattr(self, attr, n - 1)
            return bool(n)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _record(self, data: bytes) -> None:
        if data.startswith(METHODS):
            self.requests.append(data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower())

    def _handle(self, conn: socket.socket) -> None:
        try:
            first = conn.recv(65536)
            if self._take("reset_next"):
                return _reset(conn)
            if self._take("slowdown_next"):
                conn.sendall(SLOWDOWN)
                return conn.close()
            up = socket.create_connection(self.upstream)
        except OSError:
            return conn.close()
        threading.Thread(target=self._pump_up, args=(conn, up, first), daemon=True).start()
        sent = 0
        try:
            while data := up.recv(65536):
                with self.lock:
                    cut, self.cut_after = self.cut_after, None
                if cut is not None and sent + len(data) > cut:
                    conn.sendall(data[: max(0, cut - sent)])
                    if self.before_cut:
                        self.before_cut()
                    _hang_up(conn)
                    return up.close()
                with self.lock:
                    if cut is not None:
                        self.cut_after = cut  # not reached yet in this stream
                conn.sendall(data)
                sent += len(data)
        except OSError:
            pass
        conn.close()
        up.close()

    def _pump_up(self, conn: socket.socket, up: socket.socket, data: bytes) -> None:
        try:
            while data:
                self._record(data)
                up.sendall(data)
                data = conn.recv(65536)
            up.shutdown(socket.SHUT_WR)
        except OSError:
            pass


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same contract on both backends."""
    if request.param == "local":
        st = open_store(f"file://{tmp_path / 'store'}")
    else:
        st = open_store(request.getfixturevalue("s3_store_url"))
    st.prepare()
    return st


@pytest.fixture
def s3(s3_store_url: str) -> S3Store:  # noqa: F811
    st = open_store(s3_store_url)
    assert isinstance(st, S3Store)
    st.prepare()
    return st


@pytest.fixture
def proxy(s3_endpoint: dict[str, str]) -> Iterator[FaultProxy]:  # noqa: F811
    p = FaultProxy(s3_endpoint["AWS_ENDPOINT_URL"])
    yield p
    p.close()


# -- the contract, on local and S3 -----------------------------------------------------------------
def test_file_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    data = write_safetensors(src)
    sha = store.put_file("job/rounds/0/global.safetensors", src)
    assert sha == hashlib.sha256(data).hexdigest()
    dest = tmp_path / "out" / "nested" / "global.safetensors"
    assert store.get_file("job/rounds/0/global.safetensors", dest, sha) == sha
    assert dest.read_bytes() == data
    assert np.array_equal(load_file(dest)["b"], np.arange(7))
    assert store.get_file("job/rounds/0/global.safetensors", dest) == sha  # no expected sha: still fine
    assert sorted(p.name for p in dest.parent.iterdir()) == ["global.safetensors"]  # no temp files left


def test_json_round_trip(store: Store) -> None:
    record = {"num_examples": 120, "metrics": {"loss": 0.25}, "silo": "eu"}
    sha = store.put_json("job/rounds/0/updates/eu.json", record)
    assert sha == sha256_bytes(json_bytes(record)) == hashlib.sha256(json_bytes(record)).hexdigest()
    assert store.get_json("job/rounds/0/updates/eu.json", sha) == record
    assert json.loads(store.get_bytes("job/rounds/0/updates/eu.json")) == record
    with pytest.raises(ChecksumMismatch):
        store.get_json("job/rounds/0/updates/eu.json", "0" * 64)
    assert store.get_json_or_none("job/rounds/0/updates/us.json") is None


def test_list_layout(store: Store) -> None:
    keys = JobKeys("digits")
    written = [
        keys.head,
        keys.plan(0),
        keys.global_model(0),
        keys.update(0, "us"),
        keys.manifest(0, "us"),
        keys.update(0, "eu"),
        keys.result(0),
        keys.plan(1),
    ]
    for key in written:
        store.put_bytes(key, key.encode())
    store.put_bytes("digits2/HEAD.json", b"{}")  # a sibling whose name extends "digits"
    assert store.list("digits") == sorted(written)
    assert store.list("digits/") == sorted(written)
    assert store.list("digits/rounds/0/updates") == [
        "digits/rounds/0/updates/eu.safetensors",
        "digits/rounds/0/updates/us.json",
        "digits/rounds/0/updates/us.safetensors",
    ]
    assert store.list(keys.head) == [keys.head]
    assert store.list("") == sorted([*written, "digits2/HEAD.json"])
    assert store.list("nothing/here") == []
    assert store.exists(keys.head) and not store.exists("digits/rounds/9/plan.json")


def test_checksum_mismatch_removes_dest(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "update.safetensors"
    write_safetensors(src, seed=1)
    key = "job/rounds/0/updates/us.safetensors"
    sha = store.put_file(key, src)
    tamper(store, key, b"not the weights that were recorded")
    dest = tmp_path / "dl" / "us.safetensors"
    with pytest.raises(ChecksumMismatch) as info:
        store.get_file(key, dest, sha)
    assert info.value.expected == sha
    assert info.value.actual == hashlib.sha256(b"not the weights that were recorded").hexdigest()
    assert store.describe(key) in str(info.value)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_missing_objects(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ObjectMissing, match="does not exist"):
        store.get_bytes("job/HEAD.json")
    with pytest.raises(ObjectMissing):
        store.get_json("job/HEAD.json")
    dest = tmp_path / "dl" / "x.safetensors"
    with pytest.raises(ObjectMissing):
        store.get_file("job/rounds/0/global.safetensors", dest)
    assert not dest.exists()


def test_delete_prefix(store: Store) -> None:
    for key in ("a/1.json", "a/b/2.json", "ab/3.json"):
        store.put_bytes(key, b"{}")
    store.delete_prefix("a")  # type: ignore[attr-defined]
    assert store.list("") == ["ab/3.json"]


@pytest.mark.parametrize("key", ["../escape.json", "a/../../escape.json"])
def test_keys_cannot_escape(store: Store, key: str) -> None:
    with pytest.raises(ValueError, match="escape"):
        store.put_bytes(key, b"x")


# -- S3 specifics ----------------------------------------------------------------------------------
def test_prepare_creates_bucket(s3_store_url: str, tmp_path: Path) -> None:  # noqa: F811
    st = open_store(s3_store_url)
    assert isinstance(st, S3Store)
    assert st.url == s3_store_url and st.prefix == "test"
    assert "secret" not in repr(st)
    bucket = bucket_of(s3_store_url)
    assert not raw_client().bucket_exists(bucket)
    # Before prepare() the store reads as empty, like a local store whose directory does not exist yet.
    assert st.get_json_or_none("job/HEAD.json") is None
    assert st.list("") == [] and not st.exists("job/HEAD.json")
    with pytest.raises(ObjectMissing, match="prepare"):
        st.get_file("job/HEAD.json", tmp_path / "HEAD.json")
    assert list(tmp_path.iterdir()) == []
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="NoSuchBucket") as info:  # writes fail, permanent: no retries
        st.put_bytes("k.json", b"{}")
    assert time.monotonic() - t0 < 1.0
    assert "prepare" in str(info.value) and bucket in str(info.value)
    st.prepare()
    assert raw_client().bucket_exists(bucket)
    st.prepare()  # idempotent
    st.put_bytes("k.json", b"{}")
    assert st.get_bytes("k.json") == b"{}"


def test_objects_carry_sha256_metadata(s3: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "g.safetensors"
    write_safetensors(src)
    sha_file = s3.put_file("job/rounds/0/global.safetensors", src)
    sha_json = s3.put_json("job/HEAD.json", {"round": 0})
    client = raw_client()
    names = sorted(o.object_name for o in client.list_objects(s3.bucket, recursive=True))
    assert names == ["test/job/HEAD.json", "test/job/rounds/0/global.safetensors"]
    for name, sha in (("test/job/rounds/0/global.safetensors", sha_file), ("test/job/HEAD.json", sha_json)):
        assert client.stat_object(s3.bucket, name).metadata["x-amz-meta-sha256"] == sha


def test_recorded_metadata_is_checked_without_expected_sha(s3: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "u.safetensors"
    write_safetensors(src, seed=2)
    sha = s3.put_file("u.safetensors", src)
    s3.put_bytes("u.json", b'{"a": 1}')
    tamper(s3, "u.safetensors", b"swapped", metadata={"sha256": sha})
    tamper(s3, "u.json", b'{"a": 2}', metadata={"sha256": sha256_bytes(b'{"a": 1}')})
    with pytest.raises(ChecksumMismatch):
        s3.get_file("u.safetensors", tmp_path / "dl.safetensors")
    assert not (tmp_path / "dl.safetensors").exists()
    with pytest.raises(ChecksumMismatch):
        s3.get_bytes("u.json")


def test_large_file_multipart_streams(s3: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(40 * 1024 * 1024)
    size = len(data)
    src.write_bytes(data)
    sha = s3.put_file("big.bin", src)
    assert sha == hashlib.sha256(data).hexdigest()
    del data
    etag = raw_client().stat_object(s3.bucket, "test/big.bin").etag
    assert etag.endswith(f"-{-(-size // PART_SIZE)}")  # a multipart upload of PART_SIZE parts, not one PUT
    dest = tmp_path / "big.out"
    assert s3.get_file("big.bin", dest, sha) == sha
    assert dest.stat().st_size == src.stat().st_size


def test_upload_detects_a_file_changing_underneath(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "g.safetensors"
    write_safetensors(src)
    from fl_tasks.store import s3 as s3mod

    real_init = s3mod._HashingReader.__init__

    def init_after_edit(self: s3mod._HashingReader, raw: io.BufferedReader) -> None:
        with open(src, "r+b") as fh:  # someone rewrites the file between hashing and sending
            fh.seek(200)
            fh.write(b"\xff" * 8)
        real_init(self, raw)

    monkeypatch.setattr(s3mod._HashingReader, "__init__", init_after_edit)
    with pytest.raises(StoreError, match="changed while it was uploaded"):
        s3.put_file("g.safetensors", src)
    assert not s3.exists("g.safetensors")


def test_url_and_endpoint_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
    st = S3Store.from_url("s3://bucket")
    assert (st.url, st.prefix, st.endpoint) == ("s3://bucket", "", "https://s3.amazonaws.com")
    st = S3Store.from_url("s3://bucket/a/b/")
    assert (st.url, st.prefix, st._name("k.json")) == ("s3://bucket/a/b", "a/b", "a/b/k.json")
    assert parse_endpoint("http://127.0.0.1:9000") == ("127.0.0.1:9000", False, "http://127.0.0.1:9000")
    assert parse_endpoint("https://minio.example:9000/")[1] is True
    assert parse_endpoint("minio.example:9000")[1] is True
    assert parse_endpoint("http://user:pw@minio:9000")[2] == "http://minio:9000"
    with pytest.raises(ValueError) as info:
        S3Store.from_url("s3://AKIAEXAMPLE:do-not-print-me@bucket/x")
    assert "do-not-print-me" not in str(info.value)
    with pytest.raises(ValueError):
        S3Store.from_url("s3:///no-bucket")


# -- permanent errors: real SigV4 checks by moto with an IAM user ------------------------------------
def _post(endpoint: str, path: str, data: bytes, headers: dict[str, str]) -> str:
    req = urllib.request.Request(endpoint + path, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def _iam(endpoint: str, action: str, **params: str) -> str:
    body = urllib.parse.urlencode({"Action": action, "Version": "2010-05-08", **params}).encode()
    scope = "AKIDEXAMPLE/20250101/us-east-1/iam/aws4_request"  # routes to IAM; not checked in setup
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host, Signature=0",
    }
    return _post(endpoint, "/", body, headers)


def _between(text: str, tag: str) -> str:
    return text.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]


@pytest.fixture
def moto_auth(s3_store_url: str, s3_endpoint: dict[str, str]):  # noqa: F811
    """Turn on moto's IAM authentication with a user allowed everything but s3:CreateBucket.

    Yields (bucket that exists, access key, secret key). Authentication is switched off again after.
    """
    endpoint = s3_endpoint["AWS_ENDPOINT_URL"]
    open_store(s3_store_url).prepare()
    text = {"Content-Type": "text/plain"}
    _post(endpoint, "/moto-api/reset-auth", b"3", text)  # the next 3 actions skip auth: the setup
    try:
        user = f"silo-{uuid.uuid4().hex[:8]}"
        _iam(endpoint, "CreateUser", UserName=user)
        created = _iam(endpoint, "CreateAccessKey", UserName=user)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:CreateBucket", "Resource": "*"},
            ],
        }
        _iam(
            endpoint,
            "PutUserPolicy",
            UserName=user,
            PolicyName="no-create",
            PolicyDocument=json.dumps(policy),
        )
        yield bucket_of(s3_store_url), _between(created, "AccessKeyId"), _between(created, "SecretAccessKey")
    finally:
        _post(endpoint, "/moto-api/reset-auth", b"inf", text)


def _assert_no_secret(exc: BaseException, secret: str, caplog: pytest.LogCaptureFixture) -> None:
    chain, e = [], exc
    while e is not None:
        chain.append(f"{e!s} {e!r}")
        e = e.__cause__ or e.__context__
    assert secret not in " ".join(chain)
    assert secret not in caplog.text


def test_permanent_auth_errors_fail_fast_without_leaking_secrets(
    moto_auth: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bucket, access_key, secret_key = moto_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.setenv("AIRFED_S3_BACKOFF", "1")  # a retried permanent error would take seconds

    good = open_store(f"s3://{bucket}/test")
    good.put_bytes("job/HEAD.json", b"{}")  # real SigV4 verification passes with the right secret
    assert good.get_bytes("job/HEAD.json") == b"{}"

    t0 = time.monotonic()
    with pytest.raises(StoreError) as info:
        open_store(f"s3://airfed-denied-{uuid.uuid4().hex[:8]}/test").prepare()
    message = str(info.value)
    assert "AccessDenied" in message and "airfed-denied-" in message
    assert os.environ["AWS_ENDPOINT_URL"] in message and "s3:CreateBucket" in message
    _assert_no_secret(info.value, secret_key, caplog)

    wrong = "wrong-secret-5f1e9c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(StoreError, match="SignatureDoesNotMatch") as info:
        open_store(f"s3://{bucket}/test").get_bytes("job/HEAD.json")
    assert "AWS_SECRET_ACCESS_KEY does not match" in str(info.value)
    _assert_no_secret(info.value, wrong, caplog)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    with pytest.raises(StoreError, match="InvalidAccessKeyId") as info:
        open_store(f"s3://{bucket}/test").put_bytes("job/x.json", b"{}")
    _assert_no_secret(info.value, wrong, caplog)
    assert time.monotonic() - t0 < 1.0  # three permanent errors, none retried
    assert "transient" not in caplog.text


# -- transient errors: retried through a fault-injecting proxy ---------------------------------------
def test_connection_resets_are_retried(s3: S3Store, proxy: FaultProxy, caplog: pytest.LogCaptureFixture) -> None:
    s3.put_bytes("job/HEAD.json", b'{"round": 3}')
    # Each operation attempt makes 1 + 2 transport-level tries; 4 resets need a 2nd operation attempt.
    proxy.reset_next = 4
    flaky = S3Store(s3.bucket, s3.prefix, endpoint=proxy.url, **FAST)
    assert flaky.get_bytes("job/HEAD.json") == b'{"round": 3}'
    assert proxy.reset_next == 0
    assert "transient error" in caplog.text and "retry 1/1" in caplog.text

    proxy.reset_next = 1
    no_retry = S3Store(s3.bucket, s3.prefix, endpoint=proxy.url, retries=0)
    with pytest.raises(StoreError, match=r"after 1 attempt\(s\)"):
        no_retry.get_bytes("job/HEAD.json")


def test_slowdown_is_retried(s3: S3Store, proxy: FaultProxy) -> None:
    s3.put_bytes("job/HEAD.json", b"{}")
    proxy.slowdown_next = 4
    flaky = S3Store(s3.bucket, s3.prefix, endpoint=proxy.url, **FAST)
    assert flaky.get_bytes("job/HEAD.json") == b"{}"
    assert proxy.slowdown_next == 0

    proxy.slowdown_next = 10
    with pytest.raises(StoreError, match=r"after 2 attempt\(s\): SlowDown"):
        S3Store(s3.bucket, s3.prefix, endpoint=proxy.url, **FAST).get_bytes("job/HEAD.json")


def test_interrupted_download_resumes(s3: S3Store, proxy: FaultProxy, tmp_path: Path) -> None:
    data = os.urandom(6 * 1024 * 1024)
    (tmp_path / "g.bin").write_bytes(data)
    sha = s3.put_file("g.bin", tmp_path / "g.bin")
    proxy.cut_after = 2 * 1024 * 1024
    flaky = S3Store(s3.bucket, s3.prefix, endpoint=proxy.url, **FAST)
    assert flaky.get_file("g.bin", tmp_path / "out.bin", sha) == sha
    assert (tmp_path / "out.bin").read_bytes() == data
    gets = [r for r in proxy.requests if r.startswith("get /")]
    assert len(gets) == 2
    assert "range: bytes=" not in gets[0]
    assert "range: bytes=" in gets[1] and "if-match:" in gets[1]  # resumed, pinned to the same object


def test_download_restarts_when_object_is_replaced_midway(s3: S3Store, proxy: FaultProxy, tmp_path: Path) -> None:
    (tmp_path / "old.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    s3.put_file("g.bin", tmp_path / "old.bin")
    new = os.urandom(3 * 1024 * 1024)
    proxy.cut_after = 2 * 1024 * 1024
    proxy.before_cut = lambda: tamper(s3, "g.bin", new)
    flaky = S3Store(s3.bucket, s3.prefix, endpoint=proxy.url, retries=3, backoff=0.01)
    assert flaky.get_file("g.bin", tmp_path / "out.bin") == hashlib.sha256(new).hexdigest()
    assert (tmp_path / "out.bin").read_bytes() == new  # never a splice of the old and new objects
    gets = [r for r in proxy.requests if r.startswith("get /")]
    assert len(gets) == 3 and "if-match:" in gets[1] and "range:" not in gets[2]


def test_connection_refused_is_bounded(s3_store_url: str) -> None:  # noqa: F811
    t0 = time.monotonic()
    dead = S3Store(bucket_of(s3_store_url), "test", endpoint=f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01)
    with pytest.raises(StoreError, match=r"after 3 attempt\(s\).*(refused|NewConnectionError)"):
        dead.get_bytes("job/HEAD.json")
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (S3Error(SimpleNamespace(status=503), "SlowDown", "reduce", None, None, None), "transient"),
        (S3Error(SimpleNamespace(status=400), "RequestTimeout", "idle", None, None, None), "transient"),
        (S3Error(SimpleNamespace(status=500), "InternalError", "oops", None, None, None), "transient"),
        (S3Error(SimpleNamespace(status=403), "AccessDenied", "no", None, None, None), "permanent"),
        (S3Error(SimpleNamespace(status=404), "NoSuchBucket", "no", None, None, None), "permanent"),
        (S3Error(SimpleNamespace(status=403), "InvalidAccessKeyId", "no", None, None, None), "permanent"),
        (S3Error(SimpleNamespace(status=403), "SignatureDoesNotMatch", "no", None, None, None), "permanent"),
        (S3Error(SimpleNamespace(status=404), "NoSuchKey", "no", None, None, None), "missing"),
        (ServerError("bad gateway", 502), "transient"),
        (ProtocolError("Connection broken", ConnectionResetError()), "transient"),
        (ReadTimeoutError(None, "/x", "read timed out"), "transient"),
        (NewConnectionError(None, "refused"), "transient"),
        (ConnectionResetError(), "transient"),
        (OSError(28, "No space left on device"), "foreign"),  # local disk: not the network's fault
    ],
)
def test_error_classifier(exc: BaseException, kind: str) -> None:
    st = S3Store("bucket", "p", endpoint="http://127.0.0.1:1")
    assert st._classify(exc)[0] == kind
