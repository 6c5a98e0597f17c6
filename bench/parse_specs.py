"""DagBag parse time of a dags/ folder holding N copies of the example spec (and one S-silo spec).

Each measurement runs in a fresh interpreter (as a DAG processor parses a file in a fresh process):
the loader file and N specs shaped like ``dags/digits.yaml`` with different job names, parsed by
Airflow's own ``DagBag``; the time includes importing airfed's Airflow side on first use.

    python bench/parse_specs.py                 # N = 10 100 200 400, S = 500 1000
    python bench/parse_specs.py --specs 200 --silos 500

Prints one line per measurement, then ``parse_ms_per_spec=...`` (at the largest N) and
``parse_s_500_silos=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, os, sys, time
from pathlib import Path
from airfed.environment import configure
configure(dags_folder=Path(sys.argv[1]))
from airflow.dag_processing.dagbag import DagBag
started = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "dags": len(bag.dag_ids), "tasks": sum(len(d.tasks) for d in bag.dags.values()),
                  "errors": len(bag.import_errors)}))
"""


def measure(specs: list[dict]) -> dict:
    import yaml

    with tempfile.TemporaryDirectory(prefix="airfed-parse-") as tmp:
        folder = Path(tmp) / "dags"
        folder.mkdir()
        shutil.copy(REPO / "dags" / "airfed_dags.py", folder)
        for spec in specs:
            (folder / f"{spec['job']}.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "AIRFED_HOME": str(Path(tmp) / "home")}
        env.pop("AIRFED_SPECS", None)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True,
                             env=env, cwd=REPO, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, nargs="*", default=[10, 100, 200, 400])
    parser.add_argument("--silos", type=int, nargs="*", default=[500, 1000])
    ns = parser.parse_args()
    base = yaml.safe_load((REPO / "dags" / "digits.yaml").read_text())
    per_spec = None
    for n in ns.specs:
        result = measure([{**base, "job": f"digits_{i:04d}"} for i in range(n)])
        per_spec = result["seconds"] * 1000 / n
        print(f"specs={n} dags={result['dags']} tasks={result['tasks']} errors={result['errors']} "
              f"dagbag_s={result['seconds']:.3f}")
    for s in ns.silos:
        silos = [{"name": f"s{i:04d}", "data": f"/data/s{i}.npz"} for i in range(s)]
        result = measure([{**base, "job": f"silos_{s}", "silos": silos}])
        print(f"silos={s} dags={result['dags']} tasks={result['tasks']} errors={result['errors']} "
              f"dagbag_s={result['seconds']:.3f}")
        if s == 500:
            print(f"parse_s_500_silos={result['seconds']:.3f}")
    if per_spec is not None:
        print(f"parse_ms_per_spec={per_spec:.2f}")


if __name__ == "__main__":
    main()
