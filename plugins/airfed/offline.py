"""``airfed aggregate`` and ``airfed verify``: aggregation outside a DAG run, and audit of committed rounds.

``aggregate`` runs a Flower-named strategy over safetensors files. ``verify`` recomputes committed
rounds from the store: every checksum recorded for the round, then the strategy re-run over the
accepted updates, which must reproduce the committed global model (and server optimiser state).

Nothing heavy is imported with this module (it is loaded by every ``airfed`` command): the
aggregation package (NumPy) and the store are imported inside the commands; torch, flwr and mlflow
are never needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from fl_tasks.strategy_names import STRATEGY_PARAMS, parse_param, resolve_strategy_params

#: strategies whose result depends on the example counts given as IN=WEIGHT
_WEIGHTED = {"FedAvg", "FedProx", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi"}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``aggregate`` and ``verify`` on the ``airfed`` command's subparsers."""
    agg = subparsers.add_parser(
        "aggregate",
        help="aggregate safetensors updates offline with a Flower strategy",
        description="Aggregate safetensors files with a strategy named as in Flower "
        f"({', '.join(STRATEGY_PARAMS)}). Each input is PATH=WEIGHT (its num_examples); FedMedian, "
        "FedTrimmedAvg, Krum (without num_clients_to_keep) and Bulyan ignore weights, as Flower does, "
        "so PATH alone is accepted for them.",
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
    which.add_argument("--all", action="store_true", help="verify every committed round")
    verify.add_argument("--tolerance", type=float, default=0.0,
                        help="accept recomputed tensors within this absolute difference (e.g. when verifying "
                        "on another CPU architecture, whose float summation order may differ); default exact")
    verify.set_defaults(func=_cmd_verify)


# -- aggregate -------------------------------------------------------------------------------------
def _parse_inputs(strategy: str, params: dict, items: list[str]) -> list[tuple[str, float]]:
    weighted = strategy in _WEIGHTED or (strategy == "Krum" and int(params.get("num_clients_to_keep", 0)) > 0)
    inputs = []
    for item in items:
        path, sep, weight_text = item.rpartition("=")
        if not sep or Path(item).is_file():  # no weight, or a file name that itself contains '='
            path, weight_text = item, ""
        if weight_text == "":
            if weighted:
                raise ValueError(
                    f"{item!r} has no weight: {strategy} weights updates by their example counts; "
                    f"give {item}=NUM_EXAMPLES"
                )
            weight = 1.0
        else:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"{item!r}: weight {weight_text!r} is not a number (expected IN=WEIGHT)") from None
            if not weight >= 0 or weight == float("inf"):
                raise ValueError(f"{item!r}: weight must be a finite number >= 0")
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file")
        inputs.append((path, weight))
    return inputs


def _cmd_aggregate(ns: argparse.Namespace) -> int:
    try:
        params = dict(parse_param(ns.strategy, item) for item in ns.param)
        resolved = resolve_strategy_params(ns.strategy, params)
        inputs = _parse_inputs(ns.strategy, resolved, ns.inputs)
    except ValueError as exc:
        print(f"airfed aggregate: error: {exc}", file=sys.stderr)
        return 2
    from fl_tasks.aggregation import aggregate_files
    from fl_tasks.store import sha256_file

    try:
        info = aggregate_files(
            ns.strategy, params, inputs, ns.out,
            global_path=ns.global_path, state_in=ns.state_in, state_out=ns.state_out,
        )
    except (ValueError, OSError) as exc:
        print(f"airfed aggregate: error: {exc}", file=sys.stderr)
        return 1
    extra = ""
    if info.get("selected") is not None:
        extra += f"; selected {', '.join(inputs[i][0] for i in info['selected'])}"
    if info.get("state_written"):
        extra += f"; server state (round {info['server_round']}) -> {ns.state_out}"
    if info.get("state_reset"):
        extra += f"; {info['state_reset']}"
    print(f"{ns.strategy} over {len(inputs)} update(s) -> {ns.out} (sha256 {sha256_file(ns.out)}){extra}")
    return 0


# -- verify ----------------------------------------------------------------------------------------
class _Report:
    def __init__(self) -> None:
        self.failures = 0

    def ok(self, key: str, message: str) -> None:
        print(f"ok    {key}: {message}")

    def fail(self, key: str, message: str) -> None:
        self.failures += 1
        print(f"FAIL  {key}: {message}")

    def skip(self, key: str, message: str) -> None:
        print(f"skip  {key}: {message}")

    def check(self, condition: bool, key: str, good: str, bad: str) -> bool:
        (self.ok if condition else self.fail)(key, good if condition else bad)
        return condition


def _cmd_verify(ns: argparse.Namespace) -> int:
    from airfed.spec_loader import load_spec
    from fl_tasks.store import JobKeys, open_store

    spec = load_spec(ns.spec)
    store = open_store()
    keys = JobKeys(spec.job)
    report = _Report()
    head = _get_json(store, keys.head, report)
    if head is None:
        print(f"job {spec.job}: nothing committed in {store.describe(keys.head)}", file=sys.stderr)
        return 1
    if ns.all:
        rounds = [r for r in range(1, head["round"] + 1) if store.exists(keys.result(r))]
    else:
        rounds = [head["round"] if ns.round is None else ns.round]
        if rounds[0] > head["round"] or rounds[0] < 1:
            report.fail(keys.head, f"round {rounds[0]} is not committed (HEAD is round {head['round']})")
            return 1
    for r in rounds:
        print(f"== {spec.job} round {r}")
        _verify_round(store, keys, head, r, ns.tolerance, report)
    verdict = "verified" if not report.failures else f"{report.failures} check(s) FAILED"
    print(f"{spec.job}: round(s) {', '.join(map(str, rounds))} {verdict} ({store.url})")
    return 1 if report.failures else 0


def _get_json(store: Any, key: str, report: _Report) -> Any:
    from fl_tasks.store import ObjectMissing

    try:
        return store.get_json(key)
    except ObjectMissing:
        report.fail(key, "missing")
    except ValueError as exc:
        report.fail(key, f"not valid JSON: {exc}")
    return None


def _fetch(store: Any, ref: dict | None, dest: Path, report: _Report, what: str) -> Path | None:
    """Download ``ref`` ({key, sha256}) verifying its checksum; record the check."""
    from fl_tasks.store import ChecksumMismatch, ObjectMissing

    if not ref or not ref.get("key") or not ref.get("sha256"):
        report.fail(str(ref), f"{what}: no key/sha256 recorded")
        return None
    try:
        store.get_file(ref["key"], dest, ref["sha256"])
    except ChecksumMismatch as exc:
        report.fail(ref["key"], f"{what}: stored object has sha256 {exc.actual}, recorded {exc.expected}")
        return None
    except ObjectMissing:
        report.fail(ref["key"], f"{what}: missing")
        return None
    report.ok(ref["key"], f"{what}: sha256 {ref['sha256'][:16]}… matches")
    return dest


def _verify_round(store: Any, keys: Any, head: dict, r: int, tolerance: float, report: _Report) -> None:
    from fl_tasks.store import ObjectMissing, sha256_bytes

    result_key = keys.result(r)
    try:
        raw_result = store.get_bytes(result_key)
    except ObjectMissing:
        report.fail(result_key, "missing: round not committed")
        return
    result = json.loads(raw_result)
    result_sha = sha256_bytes(raw_result)
    # the result record's checksum is held by HEAD (latest round) or by the next round's plan
    if head["round"] == r:
        report.check(head.get("result_sha256") == result_sha, result_key,
                     "sha256 matches HEAD.json's result_sha256",
                     f"sha256 {result_sha} differs from HEAD.json's result_sha256 {head.get('result_sha256')}")
        report.check(
            head.get("global_key") == result["new_global"]["key"]
            and head.get("global_sha256") == result["new_global"]["sha256"],
            keys.head, "points at this round's new global",
            "global_key/global_sha256 differ from result.json's new_global",
        )
        report.check(head.get("server_state") == result.get("server_state"), keys.head,
                     "server_state matches result.json", "server_state differs from result.json's")
    else:
        later = store.get_json_or_none(keys.plan(r + 1))
        previous_head = (later or {}).get("previous_head") or {}
        if previous_head.get("round") == r:
            report.check(previous_head.get("result_sha256") == result_sha, result_key,
                         f"sha256 matches round {r + 1}'s plan (HEAD when it started)",
                         f"sha256 {result_sha} differs from {previous_head.get('result_sha256')} recorded by "
                         f"{keys.plan(r + 1)}")
        else:
            report.skip(result_key, "no later record of its sha256 (HEAD moved on without a plan for the next round)")

    plan = _get_json(store, keys.plan(r), report)
    if plan is None:
        return
    report.check(plan.get("input_global") == result.get("input_global"), keys.plan(r),
                 "input global matches result.json", "input_global differs from result.json's")
    report.check(plan.get("strategy") == result.get("strategy"), keys.plan(r),
                 "strategy matches result.json", "strategy differs from result.json's")
    previous_head = plan.get("previous_head") or None
    if previous_head:
        report.check(previous_head.get("global_sha256") == plan["input_global"]["sha256"], keys.plan(r),
                     f"input global is round {previous_head.get('round')}'s committed global",
                     "input global is not the global HEAD pointed at when the round started")

    with tempfile.TemporaryDirectory(prefix="airfed-verify-") as tmp_name:
        tmp = Path(tmp_name)
        failures_before = report.failures
        global_path = _fetch(store, plan.get("input_global"), tmp / "input_global.safetensors", report, "input global")
        inputs = []
        accepted = result.get("accepted", {})
        order = [s["name"] for s in plan.get("silos", []) if s["name"] in accepted]
        for silo in sorted(set(accepted) - set(order)):
            report.fail(result_key, f"accepted silo {silo!r} is not in the round's plan")
        for silo in order:
            record = accepted[silo]
            manifest_key = keys.manifest(r, silo)
            manifest = _get_json(store, manifest_key, report)
            if manifest is not None:
                report.check(
                    manifest.get("sha256") == record["sha256"]
                    and manifest.get("num_examples") == record["num_examples"],
                    manifest_key, "sha256 and num_examples match result.json",
                    f"manifest (sha256 {manifest.get('sha256')}, num_examples {manifest.get('num_examples')}) differs "
                    f"from result.json (sha256 {record['sha256']}, num_examples {record['num_examples']})",
                )
            ref = {"key": keys.update(r, silo), "sha256": record["sha256"]}
            path = _fetch(store, ref, tmp / f"update_{len(inputs)}.safetensors", report, f"update of {silo}")
            inputs.append((path, record["num_examples"]))
        state_in = None
        if result.get("server_state_in"):
            state_in = _fetch(store, result["server_state_in"], tmp / "state_in.safetensors", report,
                              "server optimiser state before the round")
            if r > 1:
                earlier = store.get_json_or_none(keys.result(r - 1)) or {}
                report.check(earlier.get("server_state") == result["server_state_in"], result_key,
                             f"server state in is round {r - 1}'s server state out",
                             f"server_state_in is not round {r - 1}'s server_state")
        state_ref = result.get("server_state")
        stored_state = None
        if state_ref:
            stored_state = _fetch(store, state_ref, tmp / "state.safetensors", report, "server optimiser state after")
        new_global = _fetch(store, result.get("new_global"), tmp / "new_global.safetensors", report, "new global")

        new_key = (result.get("new_global") or {}).get("key", result_key)
        if report.failures > failures_before:
            report.skip(new_key, "not recomputed: its inputs failed the checks above")
            return
        if result.get("differential_privacy"):
            report.skip(new_key, "not recomputed: the round added differential-privacy noise, which is random")
            return
        if not inputs:
            report.fail(result_key, "no accepted updates recorded")
            return
        from fl_tasks.aggregation import aggregate_files

        strategy = result.get("strategy") or plan["strategy"]
        recomputed = tmp / "recomputed.safetensors"
        recomputed_state = tmp / "recomputed_state.safetensors"
        try:
            info = aggregate_files(
                strategy["name"], strategy.get("params", {}), inputs, recomputed,
                global_path=global_path, state_in=state_in, state_out=recomputed_state,
            )
        except (ValueError, OSError) as exc:
            report.fail(new_key, f"recomputing {strategy['name']} failed: {exc}")
            return
        what = f"{strategy['name']} over {len(inputs)} accepted update(s) ({', '.join(order)})"
        _compare(recomputed, new_global, new_key, what, "the committed global", tolerance, report)
        if info["state_written"] or stored_state is not None:
            state_key = (state_ref or {}).get("key", result_key)
            if stored_state is None or not info["state_written"]:
                report.fail(state_key, "the recomputation and the committed round disagree on keeping server state")
            else:
                _compare(recomputed_state, stored_state, state_key, what, "the committed server state", tolerance,
                         report)


def _compare(ours: Path, theirs: Path, key: str, what: str, target: str, tolerance: float, report: _Report) -> None:
    """Byte equality, else tensor equality (exact, or within ``tolerance``)."""
    from fl_tasks.store import sha256_file

    if sha256_file(ours) == sha256_file(theirs):
        report.ok(key, f"recomputed {what}: reproduces {target} (sha256 equal)")
        return
    import numpy as np
    from safetensors import safe_open

    worst, problems = 0.0, []
    with safe_open(str(ours), framework="numpy") as a, safe_open(str(theirs), framework="numpy") as b:
        if set(a.keys()) != set(b.keys()):
            report.fail(key, f"recomputed {what}: tensor names differ from {target}")
            return
        for name in a.keys():
            sa, sb = a.get_slice(name), b.get_slice(name)
            if sa.get_dtype() != sb.get_dtype() or sa.get_shape() != sb.get_shape():
                problems.append(
                    f"{name} is {sb.get_dtype()}{sb.get_shape()}, recomputed {sa.get_dtype()}{sa.get_shape()}"
                )
                continue
            if sa.get_dtype() == "BF16":
                x, y = (np.asarray(t[:]).view(np.uint16) for t in (sa, sb))
                x = (x.astype(np.uint32) << 16).view(np.float32)
                y = (y.astype(np.uint32) << 16).view(np.float32)
            else:
                x, y = a.get_tensor(name), b.get_tensor(name)
            if x.size and not np.array_equal(x, y):
                diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
                worst = max(worst, diff)
                if diff > tolerance:
                    problems.append(f"{name} differs by up to {diff:.3g}")
    if problems:
        report.fail(key, f"recomputed {what} does not reproduce {target}: {'; '.join(problems[:5])}")
    elif worst:
        report.ok(key, f"recomputed {what}: equals {target} within --tolerance (max |diff| {worst:.3g})")
    else:
        report.ok(key, f"recomputed {what}: equals {target} tensor for tensor")
