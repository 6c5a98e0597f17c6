"""Per-step overhead and round wall time of the warm launcher vs the plain subprocess launcher.

    python bench/round_overhead.py [--rounds 2] [--spec dags/digits.yaml] [--run-rounds 4]

Part 1, ``round_ratio``: the example round as a user runs it, ``airfed run SPEC --rounds N --json``
(one ``dag.test()`` per round) on each path (``AIRFED_STEP_LAUNCHER=warm|subprocess``), each with
its own AIRFED_HOME; the per-round seconds come from the run's JSON summary. The first round of an
invocation pays one-time costs on both paths (Airflow's in-process API, the warm server start if
none runs), so the ratio is taken over the rounds after the first: ``round_ratio=<warm/subprocess>``.

Part 2, ``step_overhead_ratio``:

Runs every step of the example job's rounds (distribute, train/validate per silo, aggregate,
evaluate per silo, register: 12 steps a round) through both launchers, side by side in one run,
each path against its own store and MLflow DB, alternating which path goes first each round.

Each step runs as ``python -m round_overhead --timed <step args>``: this module, acting as a thin
wrapper, imports the step side (``fl_tasks.__main__`` and the step's module: the cold path's
start-up, counted as overhead) and then times ``fl_tasks.__main__.main(args)`` itself, the step's
own work (store I/O, training, MLflow), into ``AIRFED_BENCH_WORK_FILE``. Overhead = the step's wall
time as the caller sees it (start → exit code) minus that work.

Prints per step kind the mean overhead of each path, the totals, the one-time warm server start,
and ``step_overhead_ratio=<warm/subprocess>`` (mean per-step overhead; target <= 0.15).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK_FILE_ENV = "AIRFED_BENCH_WORK_FILE"


def timed_step(args: list[str]) -> int:
    """Wrapper mode: run one step in-process and record how long its ``main`` took."""
    import importlib

    from fl_tasks import __main__ as step_main

    importlib.import_module(f"fl_tasks.steps.{args[0]}")
    started = time.perf_counter()
    try:
        return step_main.main(args)
    finally:
        Path(os.environ[WORK_FILE_ENV]).write_text(repr(time.perf_counter() - started))


def run_round(launcher, calls, rnd_template: str, run_id: str, env: dict[str, str], tmp: Path) -> list[tuple]:
    """Run one round's steps in order; (step, wall_s, work_s) per step."""
    from fl_tasks.warm import run

    rows = []
    round_ref = None
    sequence = [calls["distribute"], *calls["train"], *calls["validate"], calls["aggregate"], *calls["evaluate"],
                calls["register"]]
    for call in sequence:
        values = {"{{ run_id }}": run_id, "{{ params.training | tojson }}": "{}", rnd_template: str(round_ref)}
        args = [values.get(a, a) for a in call.argv[3:]]
        work_file, result_file = tmp / "work", tmp / "result.json"
        step_env = {**env, **call.env, WORK_FILE_ENV: str(work_file), "AIRFED_RESULT_FILE": str(result_file)}
        lines: list[str] = []
        started = time.perf_counter()
        code = run(launcher, ["python", "-m", "round_overhead", "--timed", *args], step_env, str(BENCH),
                   on_line=lines.append)
        wall = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"{call.step} {call.silo or ''} exited {code}:\n" + "\n".join(lines[-30:]))
        if call.step == "distribute":
            round_ref = json.loads(result_file.read_text())["round"]
        rows.append((call.step, wall, float(work_file.read_text())))
    return rows


def round_walls(spec_path: str, rounds: int, tmp: Path) -> dict[str, list[float]]:
    """Per-round seconds of ``airfed run SPEC --rounds N`` on each launcher path."""
    from fl_tasks.warm import stop_servers

    walls: dict[str, list[float]] = {}
    for name in ("subprocess", "warm"):
        home = tmp / f"run-{name}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_", "MLFLOW_", "AIRFLOW"))}
        env.update(AIRFED_HOME=str(home), AIRFED_STEP_LAUNCHER=name)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "airfed.cli", "run", spec_path, "--rounds", str(rounds), "--json"],
                              capture_output=True, text=True, env=env, cwd=REPO)
        total = time.perf_counter() - started
        stop_servers(home / "run")
        if proc.returncode != 0:
            raise SystemExit(f"airfed run ({name}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        walls[name] = [r["seconds"] for r in summary["rounds"]]
        print(f"airfed run ({name}): {total:.1f}s for {rounds} rounds; per round "
              + " ".join(f"{w:.1f}s" for w in walls[name]), flush=True)
    return walls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the per-step comparison")
    parser.add_argument("--run-rounds", type=int, default=4, help="rounds of each `airfed run` (0: skip)")
    parser.add_argument("--spec", default=str(REPO / "dags" / "digits.yaml"))
    ns = parser.parse_args()

    from airfed.dag.step_calls import RoundRefs, round_calls
    from airfed.spec import load_spec

    from fl_tasks.warm import SubprocessLauncher, WarmLauncher, run

    round_ratio = None
    if ns.run_rounds:
        with tempfile.TemporaryDirectory(prefix="airfed-bench-") as tmp_dir:
            walls = round_walls(ns.spec, ns.run_rounds, Path(tmp_dir))
        steady = {name: w[1:] or w for name, w in walls.items()}
        for name, w in steady.items():
            print(f"round_wall_s_{name}={statistics.mean(w):.2f} (mean of rounds 2..{ns.run_rounds})")
        round_ratio = statistics.mean(steady["warm"]) / statistics.mean(steady["subprocess"])

    spec = load_spec(ns.spec)
    round_template = "{{ round }}"
    calls = round_calls(spec, RoundRefs(round=round_template, run_id="{{ run_id }}", chain_id="{{ run_id }}",
                                        training="{{ params.training | tojson }}"))
    preload = (spec.client_app.split(":")[0],)
    with tempfile.TemporaryDirectory(prefix="airfed-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        home = tmp / "home"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_", "MLFLOW_", "AIRFLOW"))}
        base["AIRFED_HOME"] = str(home)
        subprocess.run([sys.executable, "-m", "fl_tasks.prepare_data", spec.step_payload()], env=base, check=True,
                       capture_output=True)
        paths = {
            "subprocess": SubprocessLauncher(),
            "warm": WarmLauncher(idle_timeout=120, preload=preload, fallback=False),
        }
        envs = {
            name: {**base, "AIRFED_STORE_URL": f"file://{home / ('store-' + name)}",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{home / (name + '-mlflow.db')}"}
            for name in paths
        }
        # the warm server's one-time start (imports), measured apart from the steps
        started = time.perf_counter()
        run(paths["warm"], ["python", "-m", "round_overhead", "--noop"], {**envs["warm"], **calls["train"][0].env},
            str(BENCH), on_line=lambda _line: None)
        warm_start = time.perf_counter() - started

        rows: dict[str, list[tuple]] = {name: [] for name in paths}
        for r in range(1, ns.rounds + 1):
            order = list(paths) if r % 2 else list(reversed(paths))
            for name in order:
                step_tmp = tmp / f"{name}-{r}"
                step_tmp.mkdir()
                rows[name] += run_round(paths[name], calls, round_template, f"bench__{r}", envs[name], step_tmp)
                print(f"round {r} {name}: {sum(w for _, w, _ in rows[name][-12:]):.2f}s wall", flush=True)
        paths["warm"].stop(["python", "-m", "round_overhead"], {**envs["warm"], **calls["train"][0].env}, str(BENCH))

    overhead = {name: [wall - work for _, wall, work in rows[name]] for name in paths}
    for step in dict.fromkeys(step for step, _, _ in rows["subprocess"]):
        means = {name: statistics.mean(w - k for s, w, k in rows[name] if s == step) for name in paths}
        print(f"step={step} subprocess_overhead_s={means['subprocess']:.3f} warm_overhead_s={means['warm']:.3f}")
    for name in paths:
        walls = sum(w for _, w, _ in rows[name])
        works = sum(k for _, _, k in rows[name])
        print(f"{name}: steps={len(rows[name])} wall_s={walls:.2f} work_s={works:.2f} overhead_s={walls - works:.2f} "
              f"mean_step_overhead_ms={1000 * statistics.mean(overhead[name]):.0f} "
              f"median_step_overhead_ms={1000 * statistics.median(overhead[name]):.0f}")
    print(f"warm_server_start_s={warm_start:.2f} (once per server, not in the per-step figures)")
    ratio = statistics.mean(overhead["warm"]) / statistics.mean(overhead["subprocess"])
    print(f"step_overhead_ratio={ratio:.3f}")
    if round_ratio is not None:
        print(f"round_ratio={round_ratio:.3f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--timed"]:
        sys.exit(timed_step(sys.argv[2:]))
    if sys.argv[1:2] == ["--noop"]:
        sys.exit(0)
    sys.exit(main())
