"""One round of an N-silo job (tiny data per silo) on the embedded default, timed.

    python bench/large_job.py                       # 500 silos, 1 round, warm steps
    python bench/large_job.py --silos 50 --launcher subprocess

``job_spec(n)`` is the generator: the example job (``dags/digits.yaml``) with ``n`` silos whose data
the example's ``data.prepare`` partitions (iid) from sklearn's digits (1,797 images: ~3 per silo at
500). The run is ``airfed run SPEC --rounds 1 --json`` in a fresh AIRFED_HOME; prints the phases
and ``round_s_<n>_silos=...`` (the round's dag.test wall time) and ``total_s=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def job_spec(n: int, job: str = "large") -> dict:
    """The example spec with ``n`` silos ``s0000 ...`` and iid partitions of the digits data."""
    spec = yaml.safe_load((REPO / "dags" / "digits.yaml").read_text())
    spec.update(
        job=job, description=f"{n} silos, tiny data each", schedule=None, rounds_per_run=1,
        quorum={"min_silos": max(1, n // 2)},
        training={"local-epochs": 1, "lr": 0.05, "batch-size": 32},
        registry={"model_name": f"{job}-mlp"},
        data={"prepare": "examples.digits.data:prepare", "options": {"partition": "iid", "seed": 1}},
        silos=[{"name": f"s{i:04d}", "data": f"${{AIRFED_HOME}}/data/{job}/s{i:04d}.npz"} for i in range(n)],
    )
    return spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=500)
    parser.add_argument("--launcher", choices=("warm", "subprocess"), default="warm")
    parser.add_argument("--keep", action="store_true", help="keep the AIRFED_HOME (printed)")
    ns = parser.parse_args()

    from fl_tasks.warm import stop_servers

    tmp = Path(tempfile.mkdtemp(prefix="airfed-large-"))
    spec_path = tmp / "large.yaml"
    spec_path.write_text(yaml.safe_dump(job_spec(ns.silos), sort_keys=False))
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_", "MLFLOW_", "AIRFLOW"))}
    env.update(AIRFED_HOME=str(home), AIRFED_STEP_LAUNCHER=ns.launcher)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "airfed.cli", "run", str(spec_path), "--rounds", "1", "--json"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    total = time.perf_counter() - started
    stop_servers(home / "run")
    print(proc.stdout[-2000:])
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    (rnd,) = summary["rounds"]
    print(f"silos={ns.silos} launcher={ns.launcher} accepted={len(rnd['accepted'])} rejected={len(rnd['rejected'])}")
    print(f"round_s_{ns.silos}_silos={rnd['seconds']:.1f}")
    print(f"total_s={total:.1f} (incl. data preparation, DB migration, DAG build)")
    if ns.keep:
        print(f"AIRFED_HOME={home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
