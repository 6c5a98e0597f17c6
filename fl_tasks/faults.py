"""Named crash points for fault-injection tests of the commit protocol.

``AIRFED_FAULT_INJECT=aggregate:before-head`` makes the aggregate step die (like a killed pod) after
it wrote the new global and result.json but before HEAD.json. Unset in normal operation.
"""

from __future__ import annotations

import os

FAULT_ENV = "AIRFED_FAULT_INJECT"


def crash_point(name: str) -> None:
    if name in os.environ.get(FAULT_ENV, "").split(","):
        print(f"[airfed] fault injection: crashing at {name}", flush=True)
        os._exit(137)
