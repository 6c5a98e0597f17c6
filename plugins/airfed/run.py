"""``airfed run``: one DAG run of a job through Airflow's own ``dag.test()`` on the embedded default.

Airflow's own log goes to a file under ``AIRFED_HOME``; the terminal shows one progress line per
round, read from the round records the register step writes to the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from airfed.environment import configure, migrate_airflow_db
from airfed.spec_loader import load_spec
from fl_tasks.spec import JobSpec

LOADER_SOURCE = '''"""airfed run: the DAG loader (airflow DAG) for the spec(s) in AIRFED_SPECS."""
from airfed.loader import publish_dags

publish_dags(globals())
'''


def _prepare_data(spec: JobSpec, out: TextIO) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fl_tasks.prepare_data", spec.step_payload()], capture_output=True, text=True
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        print(line, file=out, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"airfed: preparing silo data for {spec.job} failed (exit {proc.returncode})")


@contextmanager
def _airflow_output_to(log_path: Path):
    """Send everything written to fds 1/2 (Airflow, task logs) to ``log_path``; yield the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_path, "ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


def progress_line(rec: dict[str, Any], seconds: float | None) -> str:
    """``round 3 | silos 3/3 accepted | train loss 0.41 | val accuracy 0.91 | v3 (champion v3) | 4.2s``"""
    total = len(rec["accepted"]) + len(rec["rejected"])
    parts = [f"round {rec['round']:>3}", f"silos {len(rec['accepted'])}/{total} accepted"]
    if rec["rejected"]:
        parts[-1] += f" (rejected: {', '.join(rec['rejected'])})"
    if rec.get("train_loss") is not None:
        parts.append(f"train loss {rec['train_loss']:.4f}")
    parts.append(f"val {rec['promotion_metric']} {rec['promotion_value']:.4f}")
    parts.append(f"model v{rec['registry_version']} (champion v{rec['champion_version']})")
    if seconds is not None:
        parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


class RoundWatcher(threading.Thread):
    """Prints a progress line whenever a new round record (registry.json) appears in the store."""

    def __init__(self, store, job: str, first_round: int, out: TextIO):
        super().__init__(daemon=True)
        self.store, self.job, self.next_round, self.out = store, job, first_round, out
        self.records: list[dict] = []
        self._done = threading.Event()
        self._last = time.time()

    def poll(self) -> None:
        from fl_tasks.store import JobKeys

        keys = JobKeys(self.job)
        while (rec := self.store.get_json_or_none(keys.registry(self.next_round))) is not None:
            now = time.time()
            rec["seconds"] = round(now - self._last, 2)
            self._last = now
            self.records.append(rec)
            print(progress_line(rec, rec["seconds"]), file=self.out, flush=True)
            self.next_round += 1

    def run(self) -> None:
        while not self._done.wait(0.5):
            self.poll()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)
        self.poll()


def run_job(spec_path: str, rounds: int | None, as_json: bool, training: dict | None = None) -> int:
    spec_path = str(Path(spec_path).resolve())
    spec = load_spec(spec_path)  # SpecError is reported by the CLI
    home_env = configure()
    home = Path(home_env["AIRFED_HOME"])
    run_dags = home / "airflow" / "run-dags"
    run_dags.mkdir(parents=True, exist_ok=True)
    (run_dags / "airfed_run_loader.py").write_text(LOADER_SOURCE)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(run_dags)
    os.environ["AIRFED_SPECS"] = spec_path
    n_rounds = rounds or spec.rounds_per_run
    os.environ["AIRFED_UNROLL_ROUNDS"] = str(n_rounds)

    from fl_tasks.store import JobKeys, open_store

    store = open_store()
    store.prepare()  # the bucket or directory (the distribute step would create it too)
    head = store.get_json_or_none(JobKeys(spec.job).head)
    start = (head["round"] if head else 0) + 1
    log_path = home / "logs" / f"run-{spec.job}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    out = sys.stdout
    print(
        f"airfed: job {spec.job} | {len(spec.silos)} silos ({', '.join(s.name for s in spec.silos)}) | "
        f"{spec.strategy.name} | rounds {start}..{start + n_rounds - 1} | runner {spec.runner} (dag.test)",
        file=out, flush=True,
    )
    print(f"airfed: Airflow log: {log_path}", file=out, flush=True)
    _prepare_data(spec, out)

    with _airflow_output_to(log_path) as terminal:
        migrate_airflow_db()
        from airfed.loader import build_all

        dags, problems = build_all([Path(spec_path)])
        if problems:
            raise SystemExit("\n".join(str(p) for p in problems))
        dag = dags[spec.job]
        watcher = RoundWatcher(store, spec.job, start, terminal)
        watcher.start()
        conf: dict[str, Any] = {"rounds": n_rounds}
        if training:
            conf["training"] = {**spec.training, **training}
        try:
            dag_run = dag.test(run_conf=conf)
        finally:
            watcher.stop()
        state = str(getattr(dag_run, "state", "unknown"))
        run_id = getattr(dag_run, "run_id", None)

    head = store.get_json_or_none(JobKeys(spec.job).head)
    records = watcher.records
    last = records[-1] if records else None
    summary = {
        "job": spec.job,
        "state": state,
        "dag_run_id": run_id,
        "rounds": [
            {
                "round": r["round"],
                "accepted": r["accepted"],
                "rejected": r["rejected"],
                "train_loss": r["train_loss"],
                "metrics": r["metrics"],
                "registry_version": r["registry_version"],
                "champion_version": r["champion_version"],
                "seconds": r["seconds"],
            }
            for r in records
        ],
        "head_round": head["round"] if head else 0,
        "registry_model": spec.model_name,
        "registry_version": last["registry_version"] if last else None,
        "champion_version": last["champion_version"] if last else None,
        "store_url": store.url,
        "mlflow_tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
        "mlflow_experiment_id": last["mlflow_experiment_id"] if last else None,
        "mlflow_run_id": last["mlflow_parent_run_id"] if last else None,
        "airflow_log": str(log_path),
    }
    reports = home / "reports" / spec.job
    reports.mkdir(parents=True, exist_ok=True)
    keys = JobKeys(spec.job)
    if records and store.exists(keys.convergence_plot):
        store.get_file(keys.convergence_plot, reports / "convergence.png")
        summary["convergence_plot"] = str(reports / "convergence.png")
    (reports / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ok = state == "success" and len(records) == n_rounds
    print(
        f"airfed: run {run_id} {state}: {len(records)}/{n_rounds} rounds committed, "
        f"HEAD is round {summary['head_round']}",
        file=out,
    )
    print(f"  store:    {store.url}/{spec.job}/", file=out)
    if last:
        print(
            f"  mlflow:   {summary['mlflow_tracking_uri']} "
            f"(experiment '{spec.experiment_name}', run {summary['mlflow_run_id']})"
            f"\n            browse with: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}",
            file=out,
        )
        print(f"  registry: models:/{spec.model_name}/{last['registry_version']} "
              f"(champion: models:/{spec.model_name}@champion = v{last['champion_version']})", file=out)
    print(f"  summary:  {reports / 'summary.json'}"
          + (f"\n  plot:     {summary['convergence_plot']}" if "convergence_plot" in summary else ""), file=out)
    if not ok:
        failed_round = watcher.next_round
        result = store.get_json_or_none(JobKeys(spec.job).result(failed_round))
        if result and result.get("dag_run_id") == run_id and not result.get("committed", True):
            print(f"  round {failed_round} was not committed: {result['reason']}", file=out)
            for silo, reason in sorted(result.get("rejected", {}).items()):
                print(f"    {silo}: {reason}", file=out)
        print(f"  airflow log with the failing task's output: {log_path}", file=out)
    if as_json:
        print(json.dumps(summary), file=out, flush=True)
    return 0 if ok else 1
