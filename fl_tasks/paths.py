"""Where airfed keeps things, how paths and URLs are shown, and numeric settings from the environment.
Pure (stdlib only).

The Airflow side imports these too (``airfed_home``, ``redact_uri``), so each fact lives here once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

N = TypeVar("N", int, float)


def airfed_home() -> Path:
    """``AIRFED_HOME`` (default ``~/.airfed``): the store, MLflow's SQLite DB and Airflow's home."""
    return Path(os.environ.get("AIRFED_HOME", "~/.airfed")).expanduser().resolve()


def expand_path(value: str) -> str:
    """Expand ``${AIRFED_HOME}``, other env vars and ``~`` in a path from a spec."""
    os.environ.setdefault("AIRFED_HOME", str(airfed_home()))
    return os.path.expandvars(os.path.expanduser(value))


def redact_uri(uri: str) -> str:
    """``uri`` with any user:password replaced by ``***``, for messages and logs (never credentials)."""
    parsed = urlsplit(uri)
    if parsed.password is None and parsed.username is None:
        return uri
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parsed.port}" if parsed.port else "")
    return urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))


def env_number(name: str, default: N, kind: Callable[[str], N], what: str) -> N:
    """A non-negative number from env var ``name`` (``default`` when unset or empty); a clear error
    naming the variable and its value otherwise (``what``: e.g. "a number of seconds")."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return max(kind("0"), kind(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {what}") from None
