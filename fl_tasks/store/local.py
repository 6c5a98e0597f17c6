"""Local-directory store: the embedded default (``file://$AIRFED_HOME/store``).

Same layout and commit rule as S3. Every write goes to a temporary file renamed into place, so a
reader never sees half an object and a crash leaves either the old object or the new one.

Conditional writes, for records that more than one writer may race for (plans, results, HEAD):
``create`` links a fully written temporary file to the key (``os.link`` fails if the key exists,
atomically, on every POSIX filesystem); ``replace_if`` takes an exclusive ``flock`` on a lock file
beside the key (``.<name>.lock``, hidden from :meth:`list`), compares the current content's sha256
(the version token) and renames the new content into place. Every conditional writer of a key goes
through that lock, so a compare and its replace are one step; plain readers need no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fl_tasks.store.base import CHUNK, ChecksumMismatch, ObjectMissing, PreconditionFailed, Store, sha256_bytes


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"store key {key!r} escapes the store root {self.root}")
        return path

    def _atomic_write(self, key: str, write: Callable[[IO[bytes]], str], *, exclusive: bool = False) -> str:
        """Write through a temporary file, then rename it over the key (or, ``exclusive``, link it
        to the key, which fails if the key exists: :class:`FileExistsError`)."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                digest = write(out)
                out.flush()
                os.fsync(out.fileno())
            if exclusive:
                os.link(tmp, target)
                Path(tmp).unlink()
            else:
                os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def _write_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> str:
        def write(out: IO[bytes]) -> str:
            out.write(data)
            return sha256_bytes(data)

        return self._atomic_write(key, write, exclusive=exclusive)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put_file(self, key: str, path: str | Path) -> str:
        def write(out: IO[bytes]) -> str:
            digest = hashlib.sha256()
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()

        return self._atomic_write(key, write)

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._write_bytes(key, data)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, sha256_bytes(data)

    def create(self, key: str, data: bytes) -> str:
        try:
            return self._write_bytes(key, data, exclusive=True)
        except FileExistsError:
            if self._path(key).read_bytes() == data:
                return sha256_bytes(data)
            raise PreconditionFailed(f"{self.describe(key)} already exists", key) from None

    def replace_if(self, key: str, data: bytes, version: str) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".{target.name}.lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
            try:
                current = target.read_bytes()
            except FileNotFoundError:
                raise PreconditionFailed(f"{self.describe(key)} does not exist (expected version {version[:12]})",
                                         key) from None
            if current == data:
                return sha256_bytes(data)
            if sha256_bytes(current) != version:
                raise PreconditionFailed(
                    f"{self.describe(key)} changed: it is version {sha256_bytes(current)[:12]}, not {version[:12]}", key
                )
            return self._write_bytes(key, data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"{self.describe(key)} does not exist") from None

    def get_file(self, key: str, dest: str | Path, sha256: str | None = None) -> str:
        src = self._path(key)
        if not src.exists():
            raise ObjectMissing(f"{self.describe(key)} does not exist")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                fout.write(chunk)
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            dest.unlink(missing_ok=True)
            raise ChecksumMismatch(self.describe(key), sha256, actual)
        return actual

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)
