"""Aggregation benchmark: airfed's streaming strategies vs Flower's own functions, same updates.

    python bench/aggregate.py --silos 16 --params 25000000 --strategies FedAvg FedMedian FedTrimmedAvg Krum

Generates N float32 updates of P parameters as safetensors files (a few tensors of realistic
sizes, each update = a shared base + its own noise), warms the page cache, then aggregates each
strategy twice, each in a fresh subprocess:

- ours:   ``fl_tasks.aggregation.aggregate_files`` streaming from the files to an output file;
- flower: the N updates loaded into NumPy lists (``safetensors.numpy.load_file``), which is what a
  Flower strategy needs (all results in memory), then Flower's function (``aggregate``,
  ``aggregate_median``, ``aggregate_trimmed_avg``, ``aggregate_krum``, ``aggregate_bulyan``) or,
  for the FedOpt family, the Flower strategy object's ``aggregate_fit``. flower_s INCLUDES the
  loading time (reported separately as flower_load_s).

Per strategy one line: ``<strategy> time_ratio=<ours/flower> rss_ratio=<ours/flower> ours_s=..
flower_s=..`` followed by peak RSS (``ru_maxrss`` of each child, nothing subtracted) and the child's
RSS right after its imports (``*_base_mb``), and how far apart the two results are (largest absolute
difference; fraction of elements differing by more than 1e-5: for Adam-type rules, elements whose
FedAvg delta is at float32 rounding level move by +-eta either way, so Flower's float32 and our
float64 FedAvg can disagree there).
``--scale-silos 64`` also runs ours (FedAvg) with 64 updates and reports its peak RSS growth.
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

from measure import peak_rss_mb  # bench/ is sys.path[0] when a benchmark runs

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = [("embed.weight", 0.40, 1024), ("block1.weight", 0.25, 1024), ("block2.weight", 0.25, 1024),
             ("head.weight", 0.0996, 256), ("block1.bias", 0.0002, None), ("block2.bias", 0.0002, None)]
FLOWER_FUNCTIONS = ("FedAvg", "FedProx", "FedMedian", "FedTrimmedAvg", "Krum", "Bulyan")


def layout(params: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes, used = [], 0
    for i, (name, fraction, width) in enumerate(FRACTIONS):
        count = params - used if i == len(FRACTIONS) - 1 else max(1, int(params * fraction))
        if width and count >= width:
            count -= count % width
            shape = (count // width, width)
        else:
            shape = (count,)
        shapes.append((name, shape))
        used += count
    return shapes


def generate(workdir: Path, silos: int, params: int, start: int = 0) -> list[Path]:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1234)
    shapes = layout(params)
    base = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes}
    if start == 0:
        save_file(base, str(workdir / "global.safetensors"))
    paths = []
    for i in range(silos):
        path = workdir / f"update_{i:03d}.safetensors"
        paths.append(path)
        if i < start and path.exists():
            continue
        rng_i = np.random.default_rng(i)
        state = {}
        for name, shape in shapes:
            noise = rng_i.standard_normal(shape, dtype=np.float32)
            noise *= 0.01
            noise += base[name]
            state[name] = noise
        save_file(state, str(path))
        del state
    return paths


def warm(paths: list[Path]) -> None:
    """Page-cache the updates (both children read them from memory) and flush dirty pages."""
    os.sync()
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


# -- children ---------------------------------------------------------------------------------------
def child_ours(strategy: str, params: dict, paths: list[str], weights: list[int], out: str, global_path: str) -> dict:
    from fl_tasks.aggregation import FEDOPT, aggregate_files

    base = peak_rss_mb()
    t0 = time.perf_counter()
    kwargs = {"global_path": global_path} if strategy in FEDOPT else {}
    aggregate_files(strategy, params, list(zip(paths, weights, strict=True)), out, **kwargs)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": peak_rss_mb(), "base_mb": base}


def child_flower(strategy: str, params: dict, paths: list[str], weights: list[int], out: str, global_path: str) -> dict:
    import numpy as np
    from flwr.server.strategy import aggregate as agg
    from safetensors.numpy import load_file, save_file

    if strategy not in FLOWER_FUNCTIONS:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server import strategy as flower_strategies
    base = peak_rss_mb()
    t0 = time.perf_counter()
    names = None
    results = []
    for path, weight in zip(paths, weights, strict=True):
        state = load_file(path)
        names = names or list(state)
        results.append(([state[name] for name in names], weight))
        del state
    loaded = time.perf_counter()
    if strategy in ("FedAvg", "FedProx"):
        result = agg.aggregate(results)
    elif strategy == "FedMedian":
        result = agg.aggregate_median(results)
    elif strategy == "FedTrimmedAvg":
        result = agg.aggregate_trimmed_avg(results, params.get("beta", 0.2))
    elif strategy == "Krum":
        result = agg.aggregate_krum(
            results, params.get("num_malicious_clients", 0), params.get("num_clients_to_keep", 0)
        )
    elif strategy == "Bulyan":
        result = agg.aggregate_bulyan(
            results, params.get("num_malicious_clients", 0), agg.aggregate_krum, to_keep=params.get("to_keep", 0)
        )
    else:
        glob = load_file(global_path)
        cls = getattr(flower_strategies, strategy)
        flower = cls(initial_parameters=ndarrays_to_parameters([glob[name] for name in names]), **params)
        del glob
        ok = Status(code=Code.OK, message="")
        fit = [(None, FitRes(ok, ndarrays_to_parameters(arrays), n, {})) for arrays, n in results]
        results.clear()
        parameters, _ = flower.aggregate_fit(1, fit, [])
        result = parameters_to_ndarrays(parameters)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    results.clear()
    save_file({name: np.ascontiguousarray(a) for name, a in zip(names, result, strict=True)}, out)
    return {"seconds": seconds, "load_seconds": loaded - t0, "peak_mb": peak, "base_mb": base}


def run_child(kind: str, strategy: str, params: dict, paths: list[Path], weights: list[int], out: Path,
              global_path: Path) -> dict:
    job = {"kind": kind, "strategy": strategy, "params": params, "paths": [str(p) for p in paths],
           "weights": weights, "out": str(out), "global": str(global_path)}
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {strategy} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def differences(a: Path, b: Path) -> tuple[float, float]:
    """(largest absolute difference, fraction of elements differing by more than 1e-5)."""
    import numpy as np
    from safetensors import safe_open

    worst, off, total = 0.0, 0, 0
    with safe_open(str(a), framework="numpy") as fa, safe_open(str(b), framework="numpy") as fb:
        for name in fa.keys():
            diff = np.abs(fa.get_tensor(name).astype(np.float64) - fb.get_tensor(name).astype(np.float64))
            if diff.size:
                worst = max(worst, float(diff.max()))
                off += int((diff > 1e-5).sum())
                total += diff.size
    return worst, off / max(1, total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--silos", type=int, default=16)
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--strategies", nargs="+", default=["FedAvg", "FedMedian", "FedTrimmedAvg", "Krum"])
    parser.add_argument("--scale-silos", type=int, default=None, help="also run ours (FedAvg) with this many silos")
    parser.add_argument("--workdir", default=None, help="where the updates go (default: a temporary directory)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()

    if ns.child:
        job = json.loads(ns.child)
        fn = child_ours if job["kind"] == "ours" else child_flower
        print(json.dumps(fn(job["strategy"], job["params"], job["paths"], job["weights"], job["out"], job["global"])))
        return 0

    with tempfile.TemporaryDirectory(prefix="airfed-bench-", dir=ns.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        paths = generate(work, ns.silos, ns.params)
        os.sync()  # no dirty pages left from generating: writeback would throttle whoever writes next
        weights = [100 + 37 * i for i in range(ns.silos)]
        print(f"# {ns.silos} updates x {ns.params:,} float32 params ({ns.params * 4 / 1e6:,.0f} MB each), "
              f"tensors {[shape for _n, shape in layout(ns.params)]}; generated in {time.perf_counter() - t0:.1f}s")
        print("# ours: fl_tasks.aggregation.aggregate_files streaming the files -> output file")
        print("# flower: safetensors.numpy.load_file of every update into NumPy lists (as Flower's strategies "
              "need them), then Flower's own function; flower_s INCLUDES that loading (flower_load_s)")
        print("# rss: peak RSS of each child process (its own ru_maxrss high-water mark, VmHWM: interpreter + "
              "imports + work, nothing subtracted); *_base_mb: the same right after the child's imports")
        for strategy in ns.strategies:
            params: dict = {}
            warm(paths)
            ours = run_child("ours", strategy, params, paths, weights, work / "ours.safetensors",
                             work / "global.safetensors")
            warm(paths)
            flower = run_child("flower", strategy, params, paths, weights, work / "flower.safetensors",
                               work / "global.safetensors")
            worst, frac = differences(work / "ours.safetensors", work / "flower.safetensors")
            print(
                f"{strategy} time_ratio={ours['seconds'] / flower['seconds']:.3f} "
                f"rss_ratio={ours['peak_mb'] / flower['peak_mb']:.3f} "
                f"ours_s={ours['seconds']:.2f} flower_s={flower['seconds']:.2f} "
                f"flower_load_s={flower['load_seconds']:.2f} "
                f"ours_rss_mb={ours['peak_mb']:.0f} flower_rss_mb={flower['peak_mb']:.0f} "
                f"ours_base_mb={ours['base_mb']:.0f} flower_base_mb={flower['base_mb']:.0f} "
                f"max_abs_diff={worst:.2e} frac_diff_gt_1e-5={frac:.1e}",
                flush=True,
            )
        if ns.scale_silos:
            small = run_child("ours", "FedAvg", {}, paths, weights, work / "ours.safetensors",
                              work / "global.safetensors")
            more = generate(work, ns.scale_silos, ns.params, start=ns.silos)
            os.sync()
            warm(more)
            big = run_child("ours", "FedAvg", {}, more, [100 + 37 * i for i in range(ns.scale_silos)],
                            work / "ours.safetensors", work / "global.safetensors")
            print(
                f"FedAvg scaling ours_rss_mb@{ns.silos}={small['peak_mb']:.0f} "
                f"ours_rss_mb@{ns.scale_silos}={big['peak_mb']:.0f} rss_growth={big['peak_mb'] / small['peak_mb']:.3f} "
                f"ours_s@{ns.silos}={small['seconds']:.2f} ours_s@{ns.scale_silos}={big['seconds']:.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
