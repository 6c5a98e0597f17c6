"""Weight and round-record store. ``open_store()`` picks the backend from ``AIRFED_STORE_URL``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlparse

from fl_tasks.paths import airfed_home
from fl_tasks.records import RecordError
from fl_tasks.store.base import (
    ChecksumMismatch,
    JobKeys,
    ObjectMissing,
    PreconditionFailed,
    Store,
    StoreError,
    sha256_bytes,
    sha256_file,
)

__all__ = [
    "ChecksumMismatch",
    "JobKeys",
    "ObjectMissing",
    "PreconditionFailed",
    "RecordError",
    "Store",
    "StoreError",
    "airfed_home",
    "default_store_url",
    "open_store",
    "sha256_bytes",
    "sha256_file",
]


def default_store_url() -> str:
    return os.environ.get("AIRFED_STORE_URL") or f"file://{airfed_home() / 'store'}"


def open_store(url: str | None = None, environ: Mapping[str, str] | None = None) -> Store:
    """The store named by ``url`` (default ``AIRFED_STORE_URL``, else the local embedded store); an S3
    store's endpoint and credentials from ``environ`` (default: this process's environment)."""
    url = url or default_store_url()
    parsed = urlparse(url)
    if parsed.scheme == "file" or (parsed.scheme == "" and url.startswith("/")):
        from fl_tasks.store.local import LocalStore

        return LocalStore(parsed.path if parsed.scheme else url)
    if parsed.scheme == "s3":
        from fl_tasks.store.s3 import S3Store

        return S3Store.from_url(url, environ)
    raise ValueError(
        f"AIRFED_STORE_URL={url!r}: unsupported scheme {parsed.scheme!r}; use file:///path or s3://bucket/prefix"
    )
