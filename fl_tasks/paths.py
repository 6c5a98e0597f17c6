"""Expand ``${AIRFED_HOME}``, other env vars and ``~`` in paths from specs."""

from __future__ import annotations

import os

from fl_tasks.store import airfed_home


def expand_path(value: str) -> str:
    os.environ.setdefault("AIRFED_HOME", str(airfed_home()))
    return os.path.expandvars(os.path.expanduser(value))
