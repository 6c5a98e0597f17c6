"""Server-side optimisers over the FedAvg result: FedAvgM, FedAdagrad, FedAdam, FedYogi (Flower's rules).

Each round: avg = FedAvg(updates); delta = avg - x (x: the round's input global model), then

- FedAvgM: g = x - avg; m = server_momentum * m + g (m = g the first time); x' = x - lr * m
  (plain FedAvg when server_learning_rate == 1 and server_momentum == 0, as Flower skips it then);
- FedAdagrad: m = delta; v = v + delta^2; x' = x + eta * m / (sqrt(v) + tau);
- FedAdam: m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
  x' = x + eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * m / (sqrt(v) + tau);
- FedYogi: m as Adam; v = v - (1 - b2) delta^2 sign(v - delta^2); x' = x + eta * m / (sqrt(v) + tau).

``m``/``v`` start at zero. Flower keeps them on the strategy object for the life of one server
process; here they are a safetensors file (``m_t/<tensor>``, ``v_t/<tensor>`` or
``momentum/<tensor>``; metadata: strategy and step ``t``) that the aggregate step stores per round,
so a nightly schedule continues the optimiser where the previous run stopped. ``t`` counts the
rounds this optimiser state has seen (Flower's ``server_round`` in one continuous run).

Streamed chunk by chunk like FedAvg; the new global and the new state are written as they are
computed. The FedAvg result is materialised in the tensor's dtype before the update (as Flower's is),
the update itself runs in float64; state is stored in float32 (float64 for float64 tensors).
Integer tensors (e.g. BatchNorm counters) get the rounded FedAvg result and no optimiser state.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from fl_tasks.aggregation.fedavg import check_weights, weighted_means, write_mean
from fl_tasks.aggregation.stream import (
    SafetensorsFile,
    TensorSpec,
    UpdateSet,
    check_same_layout,
    decode,
    encode,
    is_float,
    writing,
)

STATE_FORMAT = "airfed-server-state/1"


def state_slots(strategy: str, params: dict) -> tuple[str, ...]:
    if strategy == "FedAvgM":
        return ("momentum",) if params["server_momentum"] > 0.0 else ()
    return ("m_t", "v_t")


def server_opt(strategy: str, params: dict) -> bool:
    """False for FedAvgM with lr 1 and no momentum: Flower then returns the plain FedAvg result."""
    if strategy == "FedAvgM":
        return params["server_momentum"] != 0.0 or params["server_learning_rate"] != 1.0
    return True


def _state_spec(spec: TensorSpec) -> TensorSpec:
    return TensorSpec("F64" if spec.dtype == "F64" else "F32", spec.shape)


def read_state_info(path: str | Path) -> dict[str, str]:
    """The metadata of a server-state file (format, strategy, step)."""
    state = SafetensorsFile(path)
    state.close()
    return state.metadata


def _open_state(
    state_in: str | Path, strategy: str, expected: dict[str, TensorSpec]
) -> tuple[SafetensorsFile | None, int, str | None]:
    """(state file or None, step of this round, reason the state was not continued)."""
    previous = SafetensorsFile(state_in)
    meta = previous.metadata
    try:
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{state_in}: not an airfed server-state file (metadata {meta})")
        if meta.get("strategy") != strategy:
            previous.close()
            return None, 1, f"the previous server state is {meta.get('strategy')}'s: {strategy} starts afresh"
        missing = sorted(set(expected) - set(previous.specs))
        if missing:
            raise ValueError(f"{state_in}: server state lacks {missing[:5]}: it does not match the model")
        for key, spec in expected.items():
            if previous.specs[key] != spec:
                raise ValueError(f"{state_in}: {key} is {previous.specs[key].describe()}, expected {spec.describe()}")
        return previous, int(meta.get("step", "0")) + 1, None
    except BaseException:
        previous.close()
        raise


def fedopt_files(
    strategy: str,
    params: dict,
    inputs: Sequence[tuple[str | Path, float]],
    out_path: str | Path,
    *,
    global_path: str | Path | None,
    state_in: str | Path | None,
    state_out: str | Path | None,
) -> dict:
    """Aggregate with a server optimiser; read the optimiser state from ``state_in`` (None: first
    round) and write the new one to ``state_out`` (None: discard it)."""
    weights = check_weights([w for _p, w in inputs], strategy)
    with UpdateSet([p for p, _w in inputs]) as updates:
        if not server_opt(strategy, params):
            write_mean(updates, weights, out_path)
            return {"server_round": None, "state_written": False}
        if global_path is None:
            raise ValueError(f"{strategy} needs the round's input global model (global_path)")
        slots = state_slots(strategy, params)
        float_names = [name for name in updates.order if is_float(updates.specs[name].dtype)]
        expected = {f"{slot}/{name}": _state_spec(updates.specs[name]) for slot in slots for name in float_names}
        current = SafetensorsFile(global_path)
        previous, step, reset = None, 1, None
        try:
            check_same_layout(updates.files[0].path, updates.specs, current.path, current.specs)
            if state_in is not None and slots:
                previous, step, reset = _open_state(state_in, strategy, expected)
            _run(strategy, params, updates, weights, current, previous, slots, float_names, step, out_path, state_out)
        finally:
            current.close()
            if previous is not None:
                previous.close()
    info: dict = {"server_round": step, "state_written": state_out is not None and bool(slots)}
    if reset:
        info["state_reset"] = reset
    return info


def _run(
    strategy: str,
    p: dict,
    updates: UpdateSet,
    weights: np.ndarray,
    current: SafetensorsFile,
    previous: SafetensorsFile | None,
    slots: tuple[str, ...],
    float_names: list[str],
    step: int,
    out_path: str | Path,
    state_out: str | Path | None,
) -> None:
    size = updates.chunk_size(len(updates))
    layout = [(name, updates.specs[name]) for name in updates.order]
    eta_norm = 0.0
    if strategy == "FedAdam":
        b1, b2 = p["beta_1"], p["beta_2"]
        eta_norm = p["eta"] * np.sqrt(1 - np.power(b2, step + 1.0)) / (1 - np.power(b1, step + 1.0))
    out_buf: dict[np.dtype, np.ndarray] = {}
    state_buf: dict[np.dtype, np.ndarray] = {}
    cur, avg64 = np.empty(size), np.empty(size)
    prev = {slot: np.empty(size) for slot in slots}
    with ExitStack() as stack:
        writer = stack.enter_context(writing(out_path, layout))
        state_writer = None
        if state_out is not None and slots:
            state_layout = [
                (f"{slot}/{name}", _state_spec(updates.specs[name])) for slot in slots for name in float_names
            ]
            metadata = {"format": STATE_FORMAT, "strategy": strategy, "step": str(step)}
            state_writer = stack.enter_context(writing(state_out, state_layout, metadata))
        for name, spec, start, stop, mean in weighted_means(updates, weights):
            n = stop - start
            buf = out_buf.get(spec.storage)
            if buf is None:
                buf = out_buf[spec.storage] = np.empty(size, dtype=spec.storage)
            out = buf[:n]
            encode(mean, spec.dtype, out)
            if not is_float(spec.dtype):
                writer.write(name, start, out)
                continue
            avg = avg64[:n]
            decode(out, spec.dtype, avg)  # the FedAvg result as materialised in the model's dtype
            x = cur[:n]
            current.read(name, start, out)
            decode(out, spec.dtype, x)
            sspec = _state_spec(spec)
            sbuf = state_buf.get(sspec.storage)
            if sbuf is None:
                sbuf = state_buf[sspec.storage] = np.empty(size, dtype=sspec.storage)
            olds: dict[str, np.ndarray | None] = dict.fromkeys(slots)
            if previous is not None:
                for slot in slots:
                    previous.read(f"{slot}/{name}", start, sbuf[:n])
                    decode(sbuf[:n], sspec.dtype, prev[slot][:n])
                    olds[slot] = prev[slot][:n]
            new_x, news = _update(strategy, p, x, avg, olds, eta_norm)
            encode(new_x, spec.dtype, out)
            writer.write(name, start, out)
            if state_writer is not None:
                for slot in slots:
                    encode(news[slot], sspec.dtype, sbuf[:n])
                    state_writer.write(f"{slot}/{name}", start, sbuf[:n])


def _update(
    strategy: str, p: dict, x: np.ndarray, avg: np.ndarray, olds: dict, eta_norm: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One optimiser step on a chunk (float64): returns the new weights and the new state slots."""
    if strategy == "FedAvgM":
        grad = x - avg
        news = {}
        if p["server_momentum"] > 0.0:
            old = olds["momentum"]
            grad = grad if old is None else p["server_momentum"] * old + grad
            news["momentum"] = grad
        return x - p["server_learning_rate"] * grad, news
    delta = avg - x
    m_old, v_old = olds["m_t"], olds["v_t"]
    if m_old is None:
        m_old = np.zeros_like(delta)
    if v_old is None:
        v_old = np.zeros_like(delta)
    sq = delta * delta
    if strategy == "FedAdagrad":
        m = delta
        v = v_old + sq
        new_x = x + p["eta"] * m / (np.sqrt(v) + p["tau"])
    elif strategy == "FedAdam":
        m = p["beta_1"] * m_old + (1 - p["beta_1"]) * delta
        v = p["beta_2"] * v_old + (1 - p["beta_2"]) * sq
        new_x = x + eta_norm * m / (np.sqrt(v) + p["tau"])
    elif strategy == "FedYogi":
        m = p["beta_1"] * m_old + (1 - p["beta_1"]) * delta
        v = v_old - (1.0 - p["beta_2"]) * sq * np.sign(v_old - sq)
        new_x = x + p["eta"] * m / (np.sqrt(v) + p["tau"])
    else:  # pragma: no cover - dispatch guards this
        raise ValueError(f"not a server optimiser: {strategy}")
    return new_x, {"m_t": m, "v_t": v}
