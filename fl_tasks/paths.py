"""Where airfed keeps things, and how paths and URLs are shown. Pure (stdlib only).

The Airflow side imports these too (``airfed_home``, ``redact_uri``), so each fact lives here once.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


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
