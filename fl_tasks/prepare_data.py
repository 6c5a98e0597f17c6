"""``python -m fl_tasks.prepare_data SPEC_JSON``: create missing silo data with the spec's ``data.prepare``.

Used by ``airfed run`` on first use (examples and demos); real silos bring their own data.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fl_tasks.bridge import load_object
from fl_tasks.paths import expand_path
from fl_tasks.spec import JobSpec, Silo


def missing_silos(spec: JobSpec) -> list[Silo]:
    return [s for s in spec.silos if not Path(expand_path(s.data)).exists()]


def main(argv: list[str] | None = None) -> int:
    spec = JobSpec.from_step_payload((argv or sys.argv[1:])[0])
    missing = missing_silos(spec)
    if not missing:
        return 0
    prepare = spec.data.prepare
    if not prepare:
        names = ", ".join(f"{s.name} ({s.data})" for s in missing)
        print(f"[airfed] silo data missing and the spec has no data.prepare: {names}", file=sys.stderr)
        return 1
    silos = [{**s.model_dump(mode="json"), "data": expand_path(s.data)} for s in spec.silos]
    load_object(prepare)(silos, dict(spec.data.options))
    still = missing_silos(spec)
    if still:
        print(f"[airfed] {prepare} did not create: {', '.join(s.data for s in still)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
