"""``airfed aggregate`` and ``airfed verify``: argument parsing and printing only.

The logic is step-side code (:mod:`fl_tasks.audit`, :mod:`fl_tasks.aggregation`), imported when a
command runs: it needs NumPy and safetensors, which the Airflow image does not have, and the
command says so instead of failing with an ImportError. Loading this module (every ``airfed``
command does) imports nothing beyond the pure strategy names.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from types import ModuleType
from typing import Any

from fl_tasks.strategies import STRATEGIES, parse_param


def add_commands(subparsers: Any) -> None:
    """Register ``aggregate`` and ``verify`` on the ``airfed`` command's subparsers."""
    agg = subparsers.add_parser(
        "aggregate",
        help="aggregate safetensors updates offline with a Flower strategy",
        description="Aggregate safetensors files with a strategy named as in Flower "
        f"({', '.join(STRATEGIES)}) and parameters by Flower's names (flwr.serverapp.strategy). Each "
        "input is PATH=WEIGHT (its num_examples); FedMedian, FedTrimmedAvg, Krum and Bulyan ignore "
        "weights, as Flower does, so PATH alone is accepted for them.",
    )
    agg.add_argument("--strategy", required=True, help="Flower strategy name")
    agg.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="strategy parameter")
    agg.add_argument("--out", required=True, help="output .safetensors file")
    agg.add_argument("--global", dest="global_path", default=None,
                     help="the round's input global model (FedAvgM, FedAdagrad, FedAdam, FedYogi)")
    agg.add_argument("--state-in", default=None, help="server optimiser state from the previous round")
    agg.add_argument("--state-out", default=None, help="where to write the new server optimiser state")
    agg.add_argument("inputs", nargs="+", metavar="IN=WEIGHT")
    agg.set_defaults(func=_cmd_aggregate)

    verify = subparsers.add_parser(
        "verify",
        help="recompute committed rounds from the store and check every checksum",
        description="Check a committed round: the checksums of its input global, accepted updates, "
        "manifests, result record (against HEAD or the next round's plan), server optimiser state and "
        "new global; then re-run the round's strategy over the accepted updates and compare with the "
        "committed global. One line per check; exit 1 on any mismatch.",
    )
    verify.add_argument("spec")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--round", type=int, default=None, help="round to verify (default: HEAD's round)")
    which.add_argument("--all", action="store_true",
                       help="verify every committed round, and that the MLflow registry has exactly one version per "
                       "committed round holding the store's committed global (sha256)")
    verify.add_argument("--repair", action="store_true",
                        help="first register every committed round that has no registry version (in round order), "
                        "then verify as with --all")
    verify.add_argument("--tolerance", type=float, default=0.0,
                        help="accept recomputed tensors within this absolute difference (e.g. when verifying "
                        "on another CPU architecture, whose float summation order may differ); default exact")
    verify.set_defaults(func=_cmd_verify)


# -- aggregate -------------------------------------------------------------------------------------
def _step_side(command: str, module: str) -> ModuleType | None:
    """Import step-side logic, or explain that this environment lacks it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        print(
            f"airfed {command}: error: needs the step-side packages (NumPy, safetensors; the fl-task image "
            f"has them), missing here: {exc.name or exc}",
            file=sys.stderr,
        )
        return None


def _cmd_aggregate(ns: argparse.Namespace) -> int:
    audit = _step_side("aggregate", "fl_tasks.audit")
    if audit is None:
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            try:  # the command line
                params = dict(parse_param(ns.strategy, item) for item in ns.param)
                audit.check_strategy(ns.strategy, params)
                inputs = audit.parse_inputs(ns.strategy, params, ns.inputs)
            except ValueError as exc:
                print(f"airfed aggregate: error: {exc}", file=sys.stderr)
                return 2
            try:  # the files
                info = audit.aggregate_files(
                    ns.strategy, params, inputs, ns.out,
                    global_path=ns.global_path, state_in=ns.state_in, state_out=ns.state_out,
                )
            except (ValueError, OSError) as exc:
                print(f"airfed aggregate: error: {exc}", file=sys.stderr)
                return 1
        finally:
            for warning in caught:
                print(f"airfed aggregate: deprecated: {warning.message}", file=sys.stderr)
    extra = ""
    if info.get("selected") is not None:
        extra += f"; selected {', '.join(inputs[i][0] for i in info['selected'])}"
    if info.get("state_written"):
        extra += f"; server state (round {info['server_round']}) -> {ns.state_out}"
    if info.get("state_reset"):
        extra += f"; {info['state_reset']}"
    sha = audit.sha256_file(ns.out)
    print(f"{info['strategy']} over {len(inputs)} update(s) -> {ns.out} (sha256 {sha}){extra}")
    return 0


# -- verify ----------------------------------------------------------------------------------------
def _cmd_verify(ns: argparse.Namespace) -> int:
    from airfed.spec import load_spec

    audit = _step_side("verify", "fl_tasks.audit")
    if audit is None:
        return 2
    from fl_tasks.store import open_store

    spec = load_spec(ns.spec)
    store = open_store()
    report = audit.Report()
    all_rounds = ns.all or ns.repair
    if ns.repair and ns.round is not None:
        print("airfed verify: error: --repair checks every round; leave out --round", file=sys.stderr)
        return 2
    from fl_tasks.regions import region_stores

    rounds = audit.verify_job(store, spec.job, report, round_number=ns.round, all_rounds=all_rounds,
                              tolerance=ns.tolerance, region_stores=region_stores(spec, store))
    if rounds is not None and all_rounds:
        audit.verify_registry(store, spec.job, spec.model_name, report, repair=ns.repair)
    if rounds is None:
        print(f"job {spec.job}: nothing committed in {store.describe(f'{spec.job}/HEAD.json')}", file=sys.stderr)
        return 1
    verdict = "verified" if not report.failures else f"{report.failures} check(s) FAILED"
    print(f"{spec.job}: round(s) {', '.join(map(str, rounds))} {verdict} ({store.url})")
    return 1 if report.failures else 0
