"""``airfed run SPEC [--rounds N]``: N rounds of a job through Airflow's own ``dag.test()`` on the embedded default.

One DAG run is one round. Where a triggered run chains its rounds (``next_round`` triggers the next
run, which the scheduler starts), ``dag.test()`` runs exactly one DAG run and nothing schedules the
one it would trigger; so ``run`` performs the N runs itself, one ``dag.test()`` each with
``rounds=1`` (``next_round`` skips, no queued run is left behind) and the first run's id as the
chain id (one MLflow parent run for the N rounds, as for a triggered chain).

Airflow's own log goes to a file under ``AIRFED_HOME``; the terminal shows one progress line per
round, read from the round record the register step writes to the store.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from airfed.cli.terminal import output_to_log
from airfed.environment import DataPreparationFailed, configure, migrate_airflow_db, prepare_silo_data
from airfed.spec import load_spec
from fl_tasks import commit
from fl_tasks.spec import JobSpec

LOADER_SOURCE = '''"""airfed run: the DAG loader (airflow DAG) for the spec(s) in AIRFED_SPECS."""
from airfed.dag.publish import publish_dags

publish_dags(globals())
'''


def progress_line(rec: dict[str, Any], seconds: float | None) -> str:
    """``round 3 | silos 3/3 accepted | train loss 0.41 | val accuracy 0.91 | v3 (champion v3) | 4.2s``"""
    total = len(rec["accepted"]) + len(rec["rejected"])
    parts = [f"round {rec['round']:>3}", f"silos {len(rec['accepted'])}/{total} accepted"]
    if rec["rejected"]:
        parts[-1] += f" (rejected: {', '.join(rec['rejected'])})"
    if rec.get("train_loss") is not None:
        parts.append(f"train loss {rec['train_loss']:.4f}")
    value = rec.get("promotion_value")
    parts.append(f"val {rec['promotion_metric']} {value:.4f}" if value is not None else "not evaluated")
    champion = rec.get("champion_version")
    held = "awaiting approval" if rec.get("awaiting_approval") else None
    status = "; ".join(filter(None, [held, f"champion v{champion}" if champion is not None else None]))
    parts.append(f"model v{rec['registry_version']}" + (f" ({status})" if status else ""))
    if seconds is not None:
        parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


def round_entry(rec: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A round of the ``--json`` summary."""
    return {
        "round": rec["round"],
        "dag_run_id": rec["dag_run_id"],
        "accepted": rec["accepted"],
        "rejected": rec["rejected"],
        "train_loss": rec["train_loss"],
        "metrics": rec["metrics"],
        "registry_version": rec["registry_version"],
        "champion_version": rec["champion_version"],
        "awaiting_approval": bool(rec.get("awaiting_approval")),
        "seconds": seconds,
    }


def region_counts(store: Any, job: str, r: int) -> dict[str, dict[str, Any]]:
    """Per region of a committed round (jobs with regions): accepted of sampled silos, or why it is missing."""
    from fl_tasks.store import JobKeys

    result = store.get_json_or_none(JobKeys(job).result(r)) or {}
    counts = {}
    for name, outcome in sorted((result.get("regions") or {}).items()):
        entry = {"accepted": len(outcome["accepted"]), "rejected": len(outcome["rejected"]),
                 "contributed": outcome["contributed"], "total_weight": outcome["total_weight"]}
        if not outcome["contributed"]:
            entry["reason"] = outcome["reason"]
        counts[name] = entry
    return counts


def committed_record(store: Any, job: str, run_id: str | None, since: int = 1) -> dict[str, Any] | None:
    """The round record (registry.json) that DAG run ``run_id`` registered, if it committed one.

    Searched from HEAD down to round ``since``: another run of the job (a second ``airfed run``, the
    scheduler) may have committed the next round between this run's commit and this look.
    """
    from fl_tasks.store import JobKeys

    keys = JobKeys(job)
    head = store.get_json_or_none(keys.head)
    if not head or run_id is None:
        return None
    for r in range(int(head["round"]), since - 1, -1):
        record = store.get_json_or_none(keys.registry(r))
        if record and record.get("dag_run_id") == run_id:
            return record
    return None


def run_rounds(dag: Any, spec: JobSpec, store: Any, n_rounds: int, training: dict | None,
               terminal: TextIO) -> tuple[list[dict], list[str], str]:
    """N ``dag.test()`` runs of one round each; stop at the first that does not commit.

    Returns the round entries, the DAG run ids and the state of the last run.
    """
    from fl_tasks.store import JobKeys

    rounds: list[dict] = []
    run_ids: list[str] = []
    state = "unknown"
    head = store.get_json_or_none(JobKeys(spec.job).head)
    since = (head["round"] if head else 0) + 1  # the first round these runs can commit
    for _ in range(n_rounds):
        conf: dict[str, Any] = {"rounds": 1}
        if training:
            conf["training"] = {**spec.training, **training}
        if run_ids:
            conf["chain_id"] = run_ids[0]
        started = time.monotonic()
        dag_run = dag.test(run_conf=conf)
        seconds = round(time.monotonic() - started, 2)
        state = str(getattr(dag_run, "state", "unknown"))
        run_id = getattr(dag_run, "run_id", None)
        if run_id:
            run_ids.append(run_id)
        record = committed_record(store, spec.job, run_id, since) if state == "success" else None
        if record is None:
            state = state if state != "success" else "failed"
            break
        rounds.append(round_entry(record, seconds))
        line = progress_line(record, seconds)
        if spec.regions:  # the regional tier: accepted updates per region
            rounds[-1]["regions"] = region_counts(store, spec.job, record["round"])
            line += " | regions " + ", ".join(
                f"{n} {c['accepted']}/{c['accepted'] + c['rejected']}" if c["contributed"] else f"{n} missing"
                for n, c in rounds[-1]["regions"].items())
        print(line, file=terminal, flush=True)
    return rounds, run_ids, state


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

    from fl_tasks.store import JobKeys, open_store

    store = open_store()
    store.prepare()  # the bucket or directory (the distribute step would create it too)
    keys = JobKeys(spec.job)
    head = store.get_json_or_none(keys.head)
    start = (head["round"] if head else 0) + 1
    log_path = home / "logs" / f"run-{spec.job}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    out = sys.stdout
    print(
        f"airfed: job {spec.job} | {len(spec.silos)} silos ({', '.join(s.name for s in spec.silos[:10])}"
        f"{', …' if len(spec.silos) > 10 else ''}) | {spec.strategy.name} | rounds {start}..{start + n_rounds - 1} "
        f"| runner {spec.runner} (dag.test, one DAG run per round)",
        file=out, flush=True,
    )
    print(f"airfed: Airflow log: {log_path}", file=out, flush=True)
    try:
        prepare_silo_data(spec, out)  # through the step launcher: on the warm path it starts the server too
    except DataPreparationFailed as exc:
        raise SystemExit(f"airfed: {exc}") from None

    with output_to_log(log_path) as terminal:
        migrate_airflow_db()
        from airfed.dag.publish import build_all

        dags, problems = build_all([Path(spec_path)])
        if problems:
            raise SystemExit("\n".join(str(p) for p in problems))
        # Airflow, SQLAlchemy and the DAGs live as long as the process: out of the cyclic GC's way, so its
        # full collections during the rounds walk only what the rounds allocate (measured: 3 rounds of the
        # example, 11.4-11.8 -> 9.4-10.1 s of CPU in this process)
        gc.collect()
        gc.freeze()
        done, run_ids, state = run_rounds(dags[spec.job], spec, store, n_rounds, training, terminal)

    head = store.get_json_or_none(keys.head)
    records = [store.get_json(keys.registry(r["round"])) for r in done]
    outcome = commit.chain_outcome(store, keys, run_ids, start)
    last = records[-1] if records else None
    chain_id = run_ids[0] if run_ids else None
    summary: dict[str, Any] = {
        "job": spec.job,
        "state": state,
        "dag_run_id": chain_id,
        "dag_run_ids": run_ids,
        "rounds": done,
        "committed_by_others": outcome["committed_by_others"],
        "lost": outcome["lost"],
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
    if spec.regions:
        from fl_tasks.paths import redact_uri
        from fl_tasks.regions import store_env

        summary["region_stores"] = {
            r.name: redact_uri(next(iter(store_env(spec, "aggregate_region", region=r.name).values()), store.url))
            for r in spec.regions
        }
    reports = home / "reports" / spec.job
    reports.mkdir(parents=True, exist_ok=True)
    if records and store.exists(keys.convergence_plot):
        store.get_file(keys.convergence_plot, reports / "convergence.png")
        summary["convergence_plot"] = str(reports / "convergence.png")
    (reports / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ok = state == "success" and len(done) == n_rounds
    print(
        f"airfed: {len(run_ids)} DAG run(s) from {chain_id} {state}: {len(done)}/{n_rounds} rounds committed, "
        f"HEAD is round {summary['head_round']}",
        file=out,
    )
    if outcome["committed_by_others"]:
        by_run: dict[str, list[int]] = {}
        for r, winner in outcome["committed_by_others"].items():
            by_run.setdefault(winner, []).append(r)
        for winner, taken in by_run.items():
            print(f"  round(s) {', '.join(map(str, taken))} committed meanwhile by another run: {winner}", file=out)
    if outcome["lost"]:
        lost = outcome["lost"]
        print(f"  round {lost['round']} lost to run {lost['winner'] or '(unknown)'} ({lost['stage']}): "
              f"{lost['reason']}", file=out)
    print(f"  store:    {store.url}/{spec.job}/", file=out)
    if last:
        print(
            f"  mlflow:   {summary['mlflow_tracking_uri']} "
            f"(experiment '{spec.experiment_name}', run {summary['mlflow_run_id']})"
            f"\n            browse with: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}",
            file=out,
        )
        champion = last.get("champion_version")
        print(f"  registry: models:/{spec.model_name}/{last['registry_version']} "
              + (f"(champion: models:/{spec.model_name}@champion = v{champion})" if champion is not None
                 else "(no champion yet)"), file=out)
        from fl_tasks.contract import approval_dag_id

        pending = [r["registry_version"] for r in records if r.get("awaiting_approval")]
        if pending:
            print(f"  approval: v{', v'.join(map(str, pending))} await a person's approval in DAG "
                  f"{approval_dag_id(spec.job)} (answer under `airfed up`: Airflow UI, Required actions)", file=out)
    print(f"  summary:  {reports / 'summary.json'}"
          + (f"\n  plot:     {summary['convergence_plot']}" if "convergence_plot" in summary else ""), file=out)
    if not ok:
        failed_round = summary["head_round"] + 1
        result = store.get_json_or_none(keys.result(failed_round))
        if result and run_ids and result.get("dag_run_id") == run_ids[-1] and not result.get("committed", True):
            print(f"  round {failed_round} was not committed: {result['reason']}", file=out)
            for silo, reason in sorted(result.get("rejected", {}).items()):
                print(f"    {silo}: {reason}", file=out)
        print(f"  airflow log with the failing task's output: {log_path}", file=out)
    if as_json:
        print(json.dumps(summary), file=out, flush=True)
    return 0 if ok else 1


def run_command(ns: argparse.Namespace) -> int:
    training = json.loads(ns.training) if ns.training else None
    return run_job(ns.spec, ns.rounds, ns.json, training)


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run", help="N rounds of a job on the embedded default (one Airflow dag.test run per round)"
    )
    parser.add_argument("spec")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to perform (default: rounds_per_run)")
    parser.add_argument("--training", default=None, help="JSON object overriding the spec's training config")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.set_defaults(func=run_command)
