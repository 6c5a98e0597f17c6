"""The embedded SQLite MLflow store survives concurrent first use (schema created once, under a lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

FIRST_USE = """
import os, sys, time
from fl_tasks import lineage
open(sys.argv[1] + "." + sys.argv[2], "w").close()  # imported: ready
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
c = lineage.client()
exp = lineage.ensure_experiment(c, "airfed/concurrent-" + sys.argv[2])
print(exp)
"""


def test_concurrent_first_use_of_the_sqlite_store(tmp_path: Path) -> None:
    db = tmp_path / "home" / "mlflow.db"
    go = tmp_path / "go"
    env = {**os.environ, "AIRFED_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    procs = [
        subprocess.Popen([sys.executable, "-c", FIRST_USE, str(go), str(i)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    deadline = time.monotonic() + 240
    while not all(Path(f"{go}.{i}").exists() for i in range(3)):  # all of them imported mlflow and wait
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not get ready"
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert len({out.strip() for out, _ in outputs}) == 3  # three experiments, one database
    assert (tmp_path / "home" / "mlflow.db.lock").exists()
