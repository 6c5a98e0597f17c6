"""The store interface: keys, checksums and the commit rule shared by every backend.

Layout::

    <prefix>/<job>/HEAD.json
    <prefix>/<job>/rounds/<r>/plan.json
    <prefix>/<job>/rounds/<r>/global.safetensors
    <prefix>/<job>/rounds/<r>/updates/<silo>.safetensors  (+ <silo>.json)
    <prefix>/<job>/rounds/<r>/result.json
    <prefix>/<job>/lost/<dag_run_id>.json      (a run that lost a round to another run)

Every object is written with its sha256 computed while it streams; readers pass the expected
sha256 and get :class:`ChecksumMismatch` instead of the bytes when they differ.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from fl_tasks import records

R = TypeVar("R", bound=BaseModel)

CHUNK = 8 * 1024 * 1024


class StoreError(RuntimeError):
    """A store operation failed in a way the user must act on."""


class ObjectMissing(StoreError):
    """The key does not exist."""


class PreconditionFailed(StoreError):
    """A conditional write lost: :meth:`Store.create` found the key already there, or
    :meth:`Store.replace_if` found another version than the one it was given. Nothing was written."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


class ChecksumMismatch(StoreError):
    """The stored bytes do not match the sha256 recorded where they are referenced."""

    def __init__(self, key: str, expected: str, actual: str):
        super().__init__(
            f"checksum mismatch for {key}: recorded sha256 {expected}, stored object has {actual}; "
            "the object was modified or corrupted and will not be used"
        )
        self.key = key
        self.expected = expected
        self.actual = actual


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON encoding: stable bytes for the same content, so checksums are reproducible."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class JobKeys:
    """Key names of one job in the store (relative to the store's prefix)."""

    def __init__(self, job: str):
        self.job = job

    @property
    def head(self) -> str:
        return f"{self.job}/HEAD.json"

    def round_dir(self, r: int) -> str:
        return f"{self.job}/rounds/{r}"

    def plan(self, r: int) -> str:
        return f"{self.round_dir(r)}/plan.json"

    def global_model(self, r: int) -> str:
        return f"{self.round_dir(r)}/global.safetensors"

    def update(self, r: int, silo: str) -> str:
        return f"{self.round_dir(r)}/updates/{silo}.safetensors"

    def manifest(self, r: int, silo: str) -> str:
        return f"{self.round_dir(r)}/updates/{silo}.json"

    def status(self, r: int, silo: str) -> str:
        return f"{self.round_dir(r)}/updates/{silo}.status.json"

    def verdict(self, r: int, silo: str) -> str:
        return f"{self.round_dir(r)}/validation/{silo}.json"

    def evaluation(self, r: int, silo: str) -> str:
        return f"{self.round_dir(r)}/evaluation/{silo}.json"

    def result(self, r: int) -> str:
        return f"{self.round_dir(r)}/result.json"

    def partial(self, r: int, region: str) -> str:
        """A region's partial aggregate of round ``r`` (jobs with regions), in the job's store."""
        return f"{self.round_dir(r)}/regions/{region}.safetensors"

    def partial_record(self, r: int, region: str) -> str:
        """The record of that partial (RegionPartial: sha256, accepted silos, total weight, or why none)."""
        return f"{self.round_dir(r)}/regions/{region}.json"

    def server_state(self, r: int) -> str:
        return f"{self.round_dir(r)}/server_state.safetensors"

    def registry(self, r: int) -> str:
        return f"{self.round_dir(r)}/registry.json"

    def approval(self, r: int) -> str:
        """The approval of round ``r``'s candidate version (``promotion.approval: required``)."""
        return f"{self.round_dir(r)}/approval.json"

    @property
    def champion(self) -> str:
        """Who holds `champion` and how it got there (register, approval, ``airfed promote``/``rollback``)."""
        return f"{self.job}/champion.json"

    def lost(self, dag_run_id: str) -> str:
        """Why a DAG run stopped on a round another run holds (:mod:`fl_tasks.commit`)."""
        return f"{self.job}/lost/{dag_run_id.replace('/', '_')}.json"

    @property
    def convergence_plot(self) -> str:
        return f"{self.job}/reports/convergence.png"


class Store(ABC):
    """Object store for weights and round records. Backends: local directory, S3/MinIO."""

    url: str

    # -- primitives every backend implements -------------------------------------------------
    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> str:
        """Upload a local file (streamed); return its sha256."""

    @abstractmethod
    def get_file(self, key: str, dest: str | Path, sha256: str | None = None) -> str:
        """Download to ``dest`` (streamed), verifying ``sha256`` when given; return the sha256.

        On mismatch ``dest`` is removed and :class:`ChecksumMismatch` raised."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store small bytes (JSON records); return their sha256."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read small bytes; raise :class:`ObjectMissing` if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Small bytes and their version token (S3: the ETag; local: the sha256), for
        :meth:`replace_if`. Raises :class:`ObjectMissing` if absent."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> str:
        """Store small bytes only if ``key`` does not exist yet; return their sha256.

        Raises :class:`PreconditionFailed` if it exists with other bytes. If it already holds these
        very bytes the call succeeds (a retried create whose first attempt did land)."""

    @abstractmethod
    def replace_if(self, key: str, data: bytes, version: str) -> str:
        """Replace small bytes only if the stored version is still ``version`` (from
        :meth:`get_versioned`); return their sha256.

        Raises :class:`PreconditionFailed` if the object changed or vanished meanwhile. If it already
        holds these very bytes the call succeeds (a retried replace whose first attempt did land)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook; most backends need nothing
        """Create what the store needs (directory, bucket). Called by the distribute step."""

    def describe(self, key: str) -> str:
        """Human-readable location of a key, for messages."""
        return f"{self.url.rstrip('/')}/{key}"

    # -- helpers built on the primitives -------------------------------------------------------
    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, json_bytes(obj))

    def get_json(self, key: str, sha256: str | None = None) -> Any:
        data = self.get_bytes(key)
        if sha256 is not None:
            actual = sha256_bytes(data)
            if actual != sha256:
                raise ChecksumMismatch(self.describe(key), sha256, actual)
        return json.loads(data)

    def get_json_or_none(self, key: str) -> Any:
        try:
            return self.get_json(key)
        except ObjectMissing:
            return None

    # -- typed records (fl_tasks.records): how the steps read and write every JSON object ------
    def put_record(self, key: str, record: BaseModel) -> str:
        """Write a record as canonical JSON; return its sha256 (what references to it record)."""
        return self.put_bytes(key, records.dump(record))

    def get_record(self, key: str, model: type[R], sha256: str | None = None) -> R:
        """Read ``key`` as ``model``, checking ``sha256`` when given.

        Raises :class:`ObjectMissing`, :class:`ChecksumMismatch`, or :class:`RecordError` naming
        the object and the field that does not match the schema."""
        data = self.get_bytes(key)
        if sha256 is not None:
            actual = sha256_bytes(data)
            if actual != sha256:
                raise ChecksumMismatch(self.describe(key), sha256, actual)
        return records.parse(model, data, self.describe(key))

    def create_record(self, key: str, record: BaseModel) -> str:
        """:meth:`create` for a record: write it only if ``key`` does not exist yet."""
        return self.create(key, records.dump(record))

    def replace_record_if(self, key: str, record: BaseModel, version: str) -> str:
        """:meth:`replace_if` for a record."""
        return self.replace_if(key, records.dump(record), version)

    def get_record_versioned(self, key: str, model: type[R]) -> tuple[R, str, str]:
        """``(record, version, sha256)`` of ``key``, for a later :meth:`replace_record_if`."""
        data, version = self.get_versioned(key)
        return records.parse(model, data, self.describe(key)), version, sha256_bytes(data)

    def get_record_or_none(self, key: str, model: type[R]) -> R | None:
        try:
            return self.get_record(key, model)
        except ObjectMissing:
            return None
