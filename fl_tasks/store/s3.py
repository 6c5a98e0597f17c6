"""S3/MinIO store (``s3://bucket/prefix``) on the ``minio`` SDK.

Same layout and contract as :class:`~fl_tasks.store.local.LocalStore`; object names are
``<prefix>/<key>``. Configuration comes from the standard AWS variables: ``AWS_ENDPOINT_URL``
(``AWS_ENDPOINT_URL_S3`` wins; the scheme decides TLS; default ``https://s3.amazonaws.com``),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` and
``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Without static keys, IRSA / ECS container credentials are
used when their variables are set, otherwise requests are anonymous.

Transfers stream, so memory does not grow with the file: uploads are multipart (``PART_SIZE``
parts). S3 takes object metadata with the first request, so ``put_file`` hashes the file once to
send ``x-amz-meta-sha256``, then hashes again what minio actually reads while uploading; a
difference means the file changed underneath and the upload is removed. Downloads are written
chunk by chunk while hashing, checked against the expected sha256 (or the recorded metadata), and
an interrupted download resumes with a ranged GET pinned to the first response's ETag.

Conditional writes (``create``: ``If-None-Match: *``; ``replace_if``: ``If-Match: <ETag>``) are
single-part PUTs of small records, which S3, MinIO and moto all evaluate atomically; a lost condition
(HTTP 412 ``PreconditionFailed``) raises :class:`PreconditionFailed` at once, and a concurrent
conditional write still in flight (409 ``ConditionalRequestConflict``) is retried like a transient
error. minio 7.2's ``put_object`` takes no request headers, so the condition travels as the headers
of its ``sse`` argument (:class:`_Condition`), which minio sends unprefixed on a single-part PUT. A
retried conditional PUT whose first attempt landed would read as lost; so a failed condition is
re-checked against the stored bytes, and identical bytes count as success.

Errors: transient failures (connection refused/reset, timeouts, HTTP 5xx, ``SlowDown``,
``RequestTimeout``) are retried with exponential backoff, ``AIRFED_S3_RETRIES`` times per operation
(default 5; base delay ``AIRFED_S3_BACKOFF`` seconds, default 0.5). Each HTTP request inside an
operation also gets a couple of quick transport-level retries, so one failed part of a large
upload is resent alone instead of restarting the whole object. Permanent failures (AccessDenied,
NoSuchBucket, InvalidAccessKeyId, SignatureDoesNotMatch, ...) raise :class:`StoreError` at once.
Messages and log lines name bucket, key and endpoint, never credentials.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

import certifi
import urllib3
from minio import Minio
from minio.credentials import IamAwsProvider, Provider, StaticProvider
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import DictType
from minio.sse import Sse
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import MaxRetryError, SSLError
from urllib3.util import Retry, Timeout

from fl_tasks.paths import env_number
from fl_tasks.store.base import CHUNK, ChecksumMismatch, ObjectMissing, PreconditionFailed, Store, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024
PART_SIZE = 8 * MIB  # the AWS CLI default; memory stays ~5 parts (3 uploading, 1 read, 1 queued)
MAX_PARTS = 10_000
READ_CHUNK = MIB  # a broken download resumes from the last whole chunk written
SHA256_META = "sha256"  # sent as x-amz-meta-sha256
DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 0.5
MAX_BACKOFF = 8.0
TRANSPORT_RETRIES = 2

MISSING_CODES = {"NoSuchKey", "NoSuchObject"}
CONDITION_CODES = {"PreconditionFailed"}
MAX_CONDITIONAL = 5 * MIB  # minio's smallest part: below it put_object is one PUT, which carries the condition
READ_OPS = {"get", "stat", "list"}  # a missing bucket reads as an empty store, as a missing directory does
TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "XMinioServerNotInitialized",
    "ConditionalRequestConflict",
}
HINTS = {
    "AccessDenied": "the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not allowed to do this "
    "on bucket {bucket}; grant the s3 permission or use other credentials",
    "AllAccessDisabled": "all access to bucket {bucket} is disabled",
    "InvalidAccessKeyId": "the access key in AWS_ACCESS_KEY_ID is unknown to {endpoint}; check the "
    "variable and AWS_ENDPOINT_URL",
    "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY does not match AWS_ACCESS_KEY_ID (or AWS_REGION is "
    "wrong for this endpoint)",
    "ExpiredToken": "AWS_SESSION_TOKEN has expired; refresh the credentials",
    "InvalidToken": "AWS_SESSION_TOKEN is invalid",
    "NoSuchBucket": "bucket {bucket} does not exist; the distribute step creates it (Store.prepare()), "
    "or create it beforehand",
    "RequestTimeTooSkewed": "this machine's clock differs from the server's by more than 15 minutes; sync it (NTP)",
    "InvalidBucketName": "{bucket} is not a valid S3 bucket name",
    "BucketAlreadyExists": "bucket name {bucket} is taken by another account; pick another bucket",
}


class _Condition(Sse):
    """Request headers for one conditional PUT, in the only public place minio 7.2's ``put_object``
    accepts them: ``sse.headers()`` is merged unprefixed into a single-part PUT's headers."""

    def __init__(self, headers: dict[str, str]):
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def tls_required(self) -> bool:
        return False


class _Restart(Exception):
    """Internal: the object changed during a resumed download; start it over (counts as transient)."""


class _HashingReader:
    """File-like wrapper hashing the bytes as minio reads them: the sha256 of what was really sent."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.digest.update(data)
        self.nbytes += len(data)
        return data


@dataclass
class _Download:
    """Progress of one download, kept across attempts so a retry resumes where the last one broke."""

    written: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    etag: str | None = None
    size: int | None = None
    recorded: str | None = None  # x-amz-meta-sha256 of the object


def _status_of(exc: InvalidResponseError) -> int:
    """The HTTP status of a non-S3 response. minio keeps it only in a private attribute, so it is read
    from the public message ("...; Response code: 503, ..."); 0 (permanent) if that ever changes."""
    match = re.search(r"Response code: (\d+)", str(exc))
    return int(match.group(1)) if match else 0



def parse_endpoint(endpoint: str) -> tuple[str, bool, str]:
    """``AWS_ENDPOINT_URL`` → (host[:port], secure, display URL without any userinfo)."""
    raw = endpoint.strip()
    parsed = urlparse(raw if "://" in raw else f"https://{raw}")
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"S3 endpoint scheme must be http or https, got {parsed.scheme!r}")
    if parsed.path not in ("", "/") or parsed.query:
        raise ValueError(f"S3 endpoint must be scheme://host[:port] without a path, got {parsed.hostname!r}")
    if not parsed.hostname:
        raise ValueError("S3 endpoint has no host")
    host = parsed.hostname if ":" not in parsed.hostname else f"[{parsed.hostname}]"
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return netloc, parsed.scheme == "https", f"{parsed.scheme}://{netloc}"


def _credentials_from_env(environ: Mapping[str, str]) -> Provider | None:
    access_key = environ.get("AWS_ACCESS_KEY_ID")
    if access_key:
        secret_key = environ.get("AWS_SECRET_ACCESS_KEY")
        if not secret_key:
            raise StoreError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
        return StaticProvider(access_key, secret_key, environ.get("AWS_SESSION_TOKEN") or None)
    if any(
        environ.get(name)
        for name in (
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        )
    ):
        return IamAwsProvider()
    return None


class S3Store(Store):
    """A bucket (and optional key prefix) on S3 or any S3-compatible server (MinIO, moto, Ceph)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        credentials: Provider | None = None,
        region: str | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        part_size: int = PART_SIZE,
        environ: Mapping[str, str] | None = None,
    ):
        """Endpoint, region and credentials not given come from ``environ`` (default: this process's
        environment): a regional-tier step opens its region's store with other settings than the job's."""
        environ = os.environ if environ is None else environ
        if not bucket:
            raise ValueError("S3 store URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        endpoint = endpoint or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
        netloc, secure, self.endpoint = parse_endpoint(endpoint or DEFAULT_ENDPOINT)
        self.region = region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None
        if retries is None:
            retries = env_number("AIRFED_S3_RETRIES", DEFAULT_RETRIES, int, "an integer")
        if backoff is None:
            backoff = env_number("AIRFED_S3_BACKOFF", DEFAULT_BACKOFF, float, "a number")
        self.retries, self.backoff = retries, backoff
        self.part_size = part_size
        if credentials is None:
            credentials = _credentials_from_env(environ)
        transport_retries = TRANSPORT_RETRIES if self.retries > 0 else 0
        http = urllib3.PoolManager(
            timeout=Timeout(connect=30, read=300),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=Retry(
                total=transport_retries,
                connect=transport_retries,
                read=transport_retries,
                status=transport_retries,
                other=0,
                backoff_factor=self.backoff * 0.4,
                status_forcelist=(500, 502, 503, 504),
                # Request bodies are in memory (one part at most), so replaying these is safe.
                # POST (create/complete multipart, multi-delete) is left to the operation retry.
                allowed_methods=frozenset({"GET", "HEAD", "PUT", "DELETE"}),
                raise_on_status=False,  # let minio parse the final 5xx into an S3Error
            ),
        )
        self._client = Minio(netloc, secure=secure, region=self.region, credentials=credentials, http_client=http)

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str] | None = None) -> S3Store:
        """``s3://bucket/prefix`` with endpoint and credentials from the environment (or ``environ``)."""
        parsed = urlparse(url)
        if parsed.scheme != "s3":
            raise ValueError(f"not an s3:// URL: {parsed.scheme}://{parsed.hostname or ''}")
        if "@" in parsed.netloc:
            raise ValueError(
                "credentials in the store URL are not supported; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY instead"
            )
        return cls(parsed.netloc, parsed.path, environ=environ)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    # -- names ---------------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"store key {key!r} is empty or escapes the store prefix of {self.url}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    # -- errors and retries --------------------------------------------------------------------
    def _hint(self, code: str) -> str:
        hint = HINTS.get(code)
        return f"; {hint.format(bucket=self.bucket, endpoint=self.endpoint)}" if hint else ""

    def _classify(self, exc: BaseException) -> tuple[str, str]:
        """(kind, reason) with kind in missing / transient / permanent / foreign (re-raise as is)."""
        if isinstance(exc, _Restart):
            return "transient", str(exc)
        if isinstance(exc, S3Error):
            code = exc.code or "UnknownError"
            reason = f"{code}: {exc.message}" if exc.message else code
            if code in MISSING_CODES:
                return "missing", reason
            if code in CONDITION_CODES:
                return "condition", reason
            status = getattr(exc.response, "status", 0) or 0
            if code in TRANSIENT_CODES or status >= 500 or status == 429:
                return "transient", reason
            return "permanent", reason + self._hint(code)
        if isinstance(exc, ServerError):
            status = exc.status_code
            return ("transient" if status >= 500 or status == 429 else "permanent"), f"HTTP {status}"
        if isinstance(exc, InvalidResponseError):
            status = _status_of(exc)
            reason = f"HTTP {status} with a non-S3 response (proxy or wrong AWS_ENDPOINT_URL?)"
            return ("transient" if status >= 500 or status == 429 else "permanent"), reason
        if isinstance(exc, SSLError) or (isinstance(exc, MaxRetryError) and isinstance(exc.reason, SSLError)):
            return "permanent", (
                f"TLS error talking to {self.endpoint} ({getattr(exc, 'reason', exc)}); check the scheme of "
                "AWS_ENDPOINT_URL and the CA bundle (SSL_CERT_FILE)"
            )
        if isinstance(exc, Urllib3HTTPError | ConnectionError | TimeoutError):
            cause = getattr(exc, "reason", None) or exc
            return "transient", f"{type(exc).__name__}: {cause}"
        return "foreign", ""

    def _call(self, op: str, key: str | None, fn: Callable[[], T], *, where: str = "", advice: str = "") -> T:
        """Run one store operation with the retry policy; map minio errors to store errors."""
        where = where or (self.describe(key) if key is not None else self.url)
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                kind, reason = self._classify(exc)
                if kind == "foreign":
                    raise
                if kind == "missing":
                    raise ObjectMissing(f"{where} does not exist") from None
                if kind == "condition":
                    raise PreconditionFailed(f"{where}: the write condition failed ({reason})", key or "") from None
                if op in READ_OPS and isinstance(exc, S3Error) and exc.code == "NoSuchBucket":
                    # Like a local store whose directory is not created yet: reads find nothing.
                    raise ObjectMissing(
                        f"{where} does not exist (bucket {self.bucket!r} does not exist yet at {self.endpoint}; "
                        "Store.prepare() in the distribute step creates it)"
                    ) from None
                if kind == "permanent":
                    raise StoreError(f"S3 {op} {where} failed at {self.endpoint}: {reason}{advice}") from exc
                if attempt == attempts:
                    raise StoreError(
                        f"S3 {op} {where} failed at {self.endpoint} after {attempts} attempt(s): {reason}"
                        f"{advice}; set AIRFED_S3_RETRIES to retry longer"
                    ) from exc
                delay = min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning(
                    "S3 %s %s: transient error (%s); retry %d/%d in %.2fs",
                    *(op, where, reason, attempt, self.retries, delay),
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- Store interface -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the bucket if missing; fail fast with an actionable message if that is forbidden."""

        def ensure() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=self.region or "us-east-1")
                log.info("created bucket %s at %s", self.bucket, self.endpoint)
            except S3Error as exc:
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

        self._call(
            "create-bucket",
            None,
            ensure,
            where=f"for bucket {self.bucket!r} (store {self.url})",
            advice=". Create the bucket beforehand, or allow s3:CreateBucket and s3:ListBucket for the "
            "credentials in AWS_ACCESS_KEY_ID",
        )

    def put_file(self, key: str, path: str | Path) -> str:
        name = self._name(key)
        with open(path, "rb") as fh:
            length = os.fstat(fh.fileno()).st_size
            # The sha256 travels as object metadata, which S3 takes with the first request, so it is
            # computed first; the hash taken while uploading proves the file did not change meanwhile.
            digest = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
            expected = digest.hexdigest()
            # S3 allows 10,000 parts: grow the part size (in whole MiB) for objects beyond that.
            part_size = max(self.part_size, -(-length // (MAX_PARTS * MIB)) * MIB)

            def upload() -> str:
                fh.seek(0)
                reader = _HashingReader(fh)
                self._client.put_object(
                    self.bucket,
                    name,
                    reader,  # type: ignore[arg-type]
                    length,
                    metadata={SHA256_META: expected},
                    part_size=part_size,
                )
                return reader.digest.hexdigest()

            sent = self._call("put", key, upload)
        if sent != expected:
            self._call("delete", key, lambda: self._client.remove_object(self.bucket, name))
            raise StoreError(f"{path} changed while it was uploaded to {self.describe(key)}; upload removed")
        return sent

    def put_bytes(self, key: str, data: bytes) -> str:
        name = self._name(key)
        sha = hashlib.sha256(data).hexdigest()

        def upload() -> None:
            self._client.put_object(self.bucket, name, io.BytesIO(data), len(data), metadata={SHA256_META: sha})

        self._call("put", key, upload)
        return sha

    def get_bytes(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        name = self._name(key)

        def download() -> tuple[bytes, str | None, str]:
            resp = self._client.get_object(self.bucket, name)
            try:
                return resp.read(), resp.headers.get(f"x-amz-meta-{SHA256_META}"), resp.headers.get("ETag", "")
            finally:
                resp.close()
                resp.release_conn()

        data, recorded, etag = self._call("get", key, download)
        if recorded:
            actual = hashlib.sha256(data).hexdigest()
            if actual != recorded:
                raise ChecksumMismatch(self.describe(key), recorded, actual)
        return data, etag

    def _put_if(self, key: str, data: bytes, condition: dict[str, str], what: str) -> str:
        """One conditional single-part PUT; identical bytes already stored count as success."""
        if len(data) >= MAX_CONDITIONAL:
            raise ValueError(f"{self.describe(key)}: conditional writes are for records under {MAX_CONDITIONAL} bytes")
        name = self._name(key)
        sha = hashlib.sha256(data).hexdigest()

        def upload() -> None:
            self._client.put_object(self.bucket, name, io.BytesIO(data), len(data),
                                    metadata={SHA256_META: sha}, sse=_Condition(condition))

        try:
            self._call("put", key, upload)
        except (PreconditionFailed, ObjectMissing):  # If-Match on a vanished object answers 404
            try:
                if self.get_bytes(key) == data:
                    return sha
            except ObjectMissing:
                pass
            raise PreconditionFailed(f"{self.describe(key)} {what}", key) from None
        return sha

    def create(self, key: str, data: bytes) -> str:
        return self._put_if(key, data, {"If-None-Match": "*"}, "already exists")

    def replace_if(self, key: str, data: bytes, version: str) -> str:
        return self._put_if(key, data, {"If-Match": version}, f"changed (or vanished) since version {version}")

    def get_file(self, key: str, dest: str | Path, sha256: str | None = None) -> str:
        """Stream to ``dest`` via a temporary file; verify ``sha256`` (else the object's metadata)."""
        name = self._name(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        got = _Download()
        try:
            with open(tmp, "wb") as out:

                def download() -> None:
                    if got.written and got.written == got.size:
                        return
                    resume: DictType | None = {"If-Match": got.etag} if got.written and got.etag else None
                    try:
                        resp = self._client.get_object(self.bucket, name, offset=got.written, request_headers=resume)
                    except S3Error as exc:
                        if exc.code == "PreconditionFailed":  # replaced since the first attempt
                            out.seek(0)
                            out.truncate()
                            _Download.__init__(got)
                            raise _Restart(f"{self.describe(key)} changed during download") from exc
                        raise
                    try:
                        if got.etag is None:
                            got.etag = resp.headers.get("ETag")
                            got.recorded = resp.headers.get(f"x-amz-meta-{SHA256_META}")
                            length = resp.headers.get("Content-Length")
                            got.size = int(length) if length is not None else None
                        for chunk in resp.stream(READ_CHUNK):
                            out.write(chunk)
                            got.digest.update(chunk)
                            got.written += len(chunk)
                    finally:
                        resp.close()
                        resp.release_conn()

                self._call("get", key, download)
            actual = got.digest.hexdigest()
            expected = sha256 or got.recorded
            if expected is not None and actual != expected:
                dest.unlink(missing_ok=True)
                raise ChecksumMismatch(self.describe(key), expected, actual)
            os.replace(tmp, dest)
            return actual
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._call("stat", key, lambda: self._client.stat_object(self.bucket, name))
        except ObjectMissing:
            return False
        return True

    def _names(self, prefix: str) -> list[str]:
        """Full object names under ``prefix`` taken as a directory (``a`` matches ``a`` and ``a/...``)."""
        prefix = prefix.strip("/")
        query: str | None
        if prefix:
            base = self._name(prefix)
            query, keep = base, (lambda n: n == base or n.startswith(f"{base}/"))
        else:
            query = f"{self.prefix}/" if self.prefix else None
            keep = (lambda n: n.startswith(query)) if query else (lambda n: True)

        def listing() -> list[str]:
            objects = self._client.list_objects(self.bucket, prefix=query, recursive=True)
            return [o.object_name for o in objects if o.object_name and keep(o.object_name)]

        try:
            return sorted(self._call("list", prefix or None, listing))
        except ObjectMissing:  # no bucket yet
            return []

    def list(self, prefix: str) -> list[str]:
        return [self._relative(n) for n in self._names(prefix)]

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix`` (the whole store when empty)."""
        names = self._names(prefix)
        for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [DeleteObject(n) for n in names[i : i + 1000]]

            def delete(batch: list[DeleteObject] = batch) -> None:
                errors = list(self._client.remove_objects(self.bucket, batch))
                if errors:
                    raise StoreError(
                        f"could not delete {len(errors)} object(s) under {self.describe(prefix)}: "
                        f"{errors[0].code} {errors[0].message}"
                    )

            self._call("delete", prefix or None, delete)
