"""Audit of the commit protocol (``airfed verify``) and offline aggregation (``airfed aggregate``).

``verify_job`` recomputes committed rounds from the store instead of trusting them: the checksum of
every object a round references (input global, accepted updates, manifests, result record, server
optimiser state, new global), the links between records (HEAD or the next round's plan hold the
result's sha256; the plan's input global is the previous HEAD's global), then the round's strategy
re-run over the accepted updates, which must reproduce the committed global and server state. It
reads the records the steps write (:mod:`fl_tasks.records`), beside the code that writes them.

Step-side dependencies (NumPy, safetensors; no torch, flwr or mlflow): ``airfed``'s CLI imports
this module lazily and says so when it is missing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

from fl_tasks.aggregation import aggregate_files
from fl_tasks.records import Head, Manifest, ObjectRef, Plan, R, RecordError, Result, parse
from fl_tasks.store import ChecksumMismatch, JobKeys, ObjectMissing, Store, sha256_bytes, sha256_file
from fl_tasks.strategies import STRATEGIES, ValidationError, check_params, describe_error, normalize


# -- aggregate -------------------------------------------------------------------------------------
def check_strategy(strategy: str, params: dict) -> None:
    """ValueError naming each bad parameter and its value (before any file is read)."""
    name, given = normalize(strategy, params)
    try:
        check_params(name, given)
    except ValidationError as exc:
        raise ValueError(describe_error(name, exc)) from None


def parse_inputs(strategy: str, params: dict, items: list[str]) -> list[tuple[str, float]]:
    """``PATH=WEIGHT`` arguments -> (path, weight); the weight may be left out where the strategy
    ignores example counts (FedMedian, FedTrimmedAvg, Krum, Bulyan)."""
    name, _ = normalize(strategy, params)
    weighted = STRATEGIES[name].weighted if name in STRATEGIES else True
    if name == "MultiKrum" and int(params.get("num_nodes_to_select", 1)) == 1:
        weighted = False
    inputs = []
    for item in items:
        path, sep, weight_text = item.rpartition("=")
        if not sep or Path(item).is_file():  # no weight, or a file name that itself contains '='
            path, weight_text = item, ""
        if weight_text == "":
            if weighted:
                raise ValueError(
                    f"{item!r} has no weight: {name} weights updates by their example counts; "
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


# -- verify ----------------------------------------------------------------------------------------
class Report:
    """The checks made, one line each (``ok``/``FAIL``/``skip``), printed through ``emit``."""

    def __init__(self, emit: Callable[[str], None] = print) -> None:
        self.failures = 0
        self.emit = emit

    def ok(self, key: str, message: str) -> None:
        self.emit(f"ok    {key}: {message}")

    def fail(self, key: str, message: str) -> None:
        self.failures += 1
        self.emit(f"FAIL  {key}: {message}")

    def skip(self, key: str, message: str) -> None:
        self.emit(f"skip  {key}: {message}")

    def check(self, condition: bool, key: str, good: str, bad: str) -> bool:
        (self.ok if condition else self.fail)(key, good if condition else bad)
        return condition


def verify_job(store: Store, job: str, report: Report, *, round_number: int | None = None, all_rounds: bool = False,
               tolerance: float = 0.0, region_stores: Mapping[str, Store] | None = None) -> list[int] | None:
    """Verify HEAD's round (or ``round_number``, or every committed round); None if nothing is committed."""
    keys = JobKeys(job)
    head = _get(store, keys.head, Head, report)
    if head is None:
        return None
    if all_rounds:
        rounds = [r for r in range(1, head.round + 1) if store.exists(keys.result(r))]
    else:
        rounds = [head.round if round_number is None else round_number]
        if rounds[0] > head.round or rounds[0] < 1:
            report.fail(keys.head, f"round {rounds[0]} is not committed (HEAD is round {head.round})")
            return rounds
    for r in rounds:
        report.emit(f"== {job} round {r}")
        verify_round(store, keys, head, r, tolerance, report, region_stores)
    return rounds


def verify_registry(store: Store, job: str, model_name: str, report: Report, *, repair: bool = False) -> list[int]:
    """The registry against the store (:func:`fl_tasks.registry_sync.check`); with ``repair``, first
    register every committed round that has no version. Returns the rounds registered. Needs MLflow."""
    from fl_tasks import registry_sync

    keys = JobKeys(job)
    repaired: list[int] = []
    try:
        import mlflow  # noqa: F401 - the registry is read with the MLflow client
    except ImportError:
        report.fail(f"registry {model_name}", "not checked: needs the MLflow client (the fl-task image has it)")
        return repaired
    if repair:
        report.emit(f"== {job} registry: registering committed rounds that have no version")
        try:
            repaired = registry_sync.backfill(store, keys, log=lambda m: report.emit(f"      {m}"))
        except Exception as exc:  # noqa: BLE001 - MLflow down: a failed check, said plainly
            report.fail(f"registry {model_name}", f"repair failed: {type(exc).__name__}: {exc}")
    report.emit(f"== {job} registry {model_name}")
    registry_sync.check(store, keys, model_name, report)
    return repaired


def _get(store: Store, key: str, model: type[R], report: Report) -> R | None:
    try:
        return store.get_record(key, model)
    except ObjectMissing:
        report.fail(key, "missing")
    except RecordError as exc:
        report.fail(key, str(exc))
    return None


def _fetch(store: Store, ref: ObjectRef | None, dest: Path, report: Report, what: str) -> Path | None:
    """Download ``ref`` verifying its checksum; record the check."""
    if ref is None:
        report.fail("(none)", f"{what}: no key/sha256 recorded")
        return None
    try:
        store.get_file(ref.key, dest, ref.sha256)
    except ChecksumMismatch as exc:
        report.fail(ref.key, f"{what}: stored object has sha256 {exc.actual}, recorded {exc.expected}")
        return None
    except ObjectMissing:
        report.fail(ref.key, f"{what}: missing")
        return None
    report.ok(ref.key, f"{what}: sha256 {ref.sha256[:16]}… matches")
    return dest


def verify_round(store: Store, keys: JobKeys, head: Head, r: int, tolerance: float, report: Report,
                 region_stores: Mapping[str, Store] | None = None) -> None:
    """Every check of one committed round (see the module docstring)."""
    result_key = keys.result(r)
    try:
        raw_result = store.get_bytes(result_key)
    except ObjectMissing:
        report.fail(result_key, "missing: round not committed")
        return
    try:
        result = parse(Result, raw_result, store.describe(result_key))
    except RecordError as exc:
        report.fail(result_key, str(exc))
        return
    result_sha = sha256_bytes(raw_result)
    # the result record's checksum is held by HEAD (latest round) or by the next round's plan
    if head.round == r:
        report.check(head.result_sha256 == result_sha, result_key,
                     "sha256 matches HEAD.json's result_sha256",
                     f"sha256 {result_sha} differs from HEAD.json's result_sha256 {head.result_sha256}")
        report.check(head.global_ref == result.new_global, keys.head, "points at this round's new global",
                     "global_key/global_sha256 differ from result.json's new_global")
        report.check(head.server_state == result.server_state, keys.head,
                     "server_state matches result.json", "server_state differs from result.json's")
    else:
        later = store.get_record_or_none(keys.plan(r + 1), Plan)
        previous_head = later.previous_head if later else None
        if previous_head is not None and previous_head.round == r:
            report.check(previous_head.result_sha256 == result_sha, result_key,
                         f"sha256 matches round {r + 1}'s plan (HEAD when it started)",
                         f"sha256 {result_sha} differs from {previous_head.result_sha256} recorded by "
                         f"{keys.plan(r + 1)}")
        else:
            report.skip(result_key, "no later record of its sha256 (HEAD moved on without a plan for the next round)")

    plan = _get(store, keys.plan(r), Plan, report)
    if plan is None:
        return
    report.check(plan.input_global == result.input_global, keys.plan(r),
                 "input global matches result.json", "input_global differs from result.json's")
    report.check(plan.strategy == result.strategy, keys.plan(r),
                 "strategy matches result.json", "strategy differs from result.json's")
    if plan.previous_head:
        report.check(plan.previous_head.global_sha256 == plan.input_global.sha256, keys.plan(r),
                     f"input global is round {plan.previous_head.round}'s committed global",
                     "input global is not the global HEAD pointed at when the round started")
    with tempfile.TemporaryDirectory(prefix="airfed-verify-") as tmp_name:
        if result.regions is not None:  # both levels: each region's partial, then the global
            from fl_tasks.audit_regions import recompute_regions

            recompute_regions(store, region_stores or {}, keys, plan, result, r, Path(tmp_name), tolerance, report)
            return
        _recompute(store, keys, plan, result, r, Path(tmp_name), tolerance, report)


def _recompute(store: Store, keys: JobKeys, plan: Plan, result: Result, r: int, tmp: Path, tolerance: float,
               report: Report) -> None:
    result_key = keys.result(r)
    failures_before = report.failures
    global_path = _fetch(store, plan.input_global, tmp / "input_global.safetensors", report, "input global")
    inputs: list[tuple[Path | None, float]] = []
    order = [s.name for s in plan.silos if s.name in result.accepted]
    for silo in sorted(set(result.accepted) - set(order)):
        report.fail(result_key, f"accepted silo {silo!r} is not in the round's plan")
    for silo in order:
        record = result.accepted[silo]
        manifest = _get(store, keys.manifest(r, silo), Manifest, report)
        if manifest is not None:
            report.check(
                manifest.sha256 == record.sha256 and manifest.num_examples == record.num_examples,
                keys.manifest(r, silo), "sha256 and num_examples match result.json",
                f"manifest (sha256 {manifest.sha256}, num_examples {manifest.num_examples}) differs "
                f"from result.json (sha256 {record.sha256}, num_examples {record.num_examples})",
            )
        ref = ObjectRef(key=keys.update(r, silo), sha256=record.sha256)
        path = _fetch(store, ref, tmp / f"update_{len(inputs)}.safetensors", report, f"update of {silo}")
        inputs.append((path, record.num_examples))
    state_in = None
    if result.server_state_in:
        state_in = _fetch(store, result.server_state_in, tmp / "state_in.safetensors", report,
                          "server optimiser state before the round")
        if r > 1:
            earlier = store.get_record_or_none(keys.result(r - 1), Result)
            report.check(earlier is not None and earlier.server_state == result.server_state_in, result_key,
                         f"server state in is round {r - 1}'s server state out",
                         f"server_state_in is not round {r - 1}'s server_state")
    stored_state = None
    if result.server_state:
        stored_state = _fetch(store, result.server_state, tmp / "state.safetensors", report,
                              "server optimiser state after")
    new_global = _fetch(store, result.new_global, tmp / "new_global.safetensors", report, "new global")

    new_key = result.new_global.key if result.new_global else result_key
    if report.failures > failures_before:
        report.skip(new_key, "not recomputed: its inputs failed the checks above")
        return
    if result.differential_privacy:
        report.skip(new_key, "not recomputed: the round added differential-privacy noise, which is random")
        return
    if not inputs:
        report.fail(result_key, "no accepted updates recorded")
        return
    strategy = result.strategy or plan.strategy
    recomputed = tmp / "recomputed.safetensors"
    recomputed_state = tmp / "recomputed_state.safetensors"
    try:
        info = aggregate_files(
            strategy.name, strategy.params, [(p, w) for p, w in inputs if p is not None], recomputed,
            global_path=global_path, state_in=state_in, state_out=recomputed_state,
        )
    except (ValueError, OSError) as exc:
        report.fail(new_key, f"recomputing {strategy.name} failed: {exc}")
        return
    what = f"{strategy.name} over {len(inputs)} accepted update(s) ({', '.join(order)})"
    assert new_global is not None
    compare(recomputed, new_global, new_key, what, "the committed global", tolerance, report)
    if info["state_written"] or stored_state is not None:
        state_key = result.server_state.key if result.server_state else result_key
        if stored_state is None or not info["state_written"]:
            report.fail(state_key, "the recomputation and the committed round disagree on keeping server state")
        else:
            compare(recomputed_state, stored_state, state_key, what, "the committed server state", tolerance, report)


def compare(ours: Path, theirs: Path, key: str, what: str, target: str, tolerance: float, report: Report) -> None:
    """Byte equality, else tensor equality (exact, or within ``tolerance``)."""
    if sha256_file(ours) == sha256_file(theirs):
        report.ok(key, f"recomputed {what}: reproduces {target} (sha256 equal)")
        return
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
