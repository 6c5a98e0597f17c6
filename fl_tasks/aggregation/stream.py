"""Chunked reading and writing of safetensors files for the aggregation strategies (NumPy only).

Why not ``safe_open(...).get_tensor`` for the data: safetensors memory-maps the whole file, and every
page a read touches stays in the process's resident set until the handle closes, so streaming N
updates through ``safe_open`` still ends with N x model resident. Here ``safe_open`` validates each
file and provides its keys, dtypes and shapes; the tensor bytes are then read chunk by chunk with
``readinto`` into a few reusable buffers at the offsets the header records, so resident memory is
O(chunk), whatever N is. The output is written the same way: header first (every shape is known
up front), then the data chunk by chunk, so not even the aggregated model is held in memory.

Importing this module does not import torch.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

#: safetensors dtype code -> NumPy storage dtype (BF16 is stored raw as uint16 and decoded by hand).
STORAGE: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
#: Elements per chunk summed over every row read at once; keeps the working set near the L2/L3 size.
STACK_ELEMENTS = 1 << 20
MIN_CHUNK = 4096
MAX_HEADER = 100 * 1024 * 1024
#: read the next chunk on a helper thread while the current one is being reduced ("0" turns it off)
READ_AHEAD = os.environ.get("AIRFED_AGG_READ_AHEAD", "1") != "0"


def is_float(code: str) -> bool:
    return code in FLOAT_CODES


def compute_dtype(code: str) -> np.dtype:
    """The dtype order statistics run in: the stored one, except BF16 (decoded to float32)."""
    return np.dtype(np.float32) if code == "BF16" else STORAGE[code]


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def storage(self) -> np.dtype:
        return STORAGE[self.dtype]

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


class SafetensorsFile:
    """One safetensors file: validated by ``safe_open``, read in chunks at the header's offsets."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with safe_open(self.path, framework="numpy") as fh:
            self.metadata: dict[str, str] = dict(fh.metadata() or {})
            specs = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                specs[name] = TensorSpec(sl.get_dtype(), tuple(int(d) for d in sl.get_shape()))
        with open(self.path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > MAX_HEADER:
                raise ValueError(f"{self.path}: safetensors header of {header_len} bytes is too large")
            header = json.loads(fh.read(header_len))
        base = 8 + header_len
        self.specs: dict[str, TensorSpec] = {}
        self.offsets: dict[str, int] = {}
        for name, spec in specs.items():
            if spec.dtype not in STORAGE:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {spec.dtype}, unsupported by aggregation")
            start, end = header[name]["data_offsets"]
            if end - start != spec.numel * spec.storage.itemsize:
                raise ValueError(f"{self.path}: tensor {name!r} data size does not match {spec.describe()}")
            self.specs[name] = spec
            self.offsets[name] = base + int(start)
        self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()

    def read(self, name: str, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous, storage dtype) with elements ``start:start+out.size`` of ``name``."""
        spec = self.specs[name]
        view = out.data.cast("B")
        self._fh.seek(self.offsets[name] + start * spec.storage.itemsize)
        done = 0
        while done < len(view):
            got = self._fh.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.path}: unexpected end of file reading tensor {name!r}")
            done += got

    def close(self) -> None:
        self._fh.close()


def output_order(specs: dict[str, TensorSpec]) -> list[str]:
    """Tensor order in written files: widest dtype first, then by name (as safetensors itself orders)."""
    return sorted(specs, key=lambda name: (-specs[name].storage.itemsize, name))


class UpdateSet:
    """N update files that must share keys, dtypes and shapes (the first file is the reference)."""

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise ValueError("aggregation needs at least one update")
        self.files: list[SafetensorsFile] = []
        try:
            for path in paths:
                self.files.append(SafetensorsFile(path))
            self.specs = self.files[0].specs
            for other in self.files[1:]:
                check_same_layout(self.files[0].path, self.specs, other.path, other.specs)
        except BaseException:
            self.close()
            raise
        self.order = output_order(self.specs)

    def __len__(self) -> int:
        return len(self.files)

    def chunk_size(self, rows: int) -> int:
        return max(MIN_CHUNK, STACK_ELEMENTS // max(1, rows))

    def chunks(self, rows: int) -> Iterator[tuple[str, TensorSpec, int, int]]:
        """(name, spec, start, stop) over every tensor in output order, flattened, in chunks."""
        size = self.chunk_size(rows)
        for name in self.order:
            spec = self.specs[name]
            for start in range(0, spec.numel, size):
                yield name, spec, start, min(spec.numel, start + size)

    def stacked(
        self, rows: Sequence[int] | None = None, spare_rows: int = 0
    ) -> Iterator[tuple[str, TensorSpec, int, int, np.ndarray]]:
        """Yield (name, spec, start, stop, stack) per chunk, where ``stack[r, :stop-start]`` holds
        the chunk of update ``rows[r]`` in its stored dtype (``spare_rows`` more rows are scratch).

        The stack is a reused buffer, valid until the next chunk is asked for; the consumer may
        overwrite it. With READ_AHEAD the next chunk is read on a helper thread meanwhile (file reads
        and NumPy both release the GIL), into the other of two buffers."""
        rows = list(range(len(self))) if rows is None else list(rows)
        height = len(rows) + spare_rows
        size = self.chunk_size(height)
        plan = list(self.chunks(height))
        buffers = {
            storage: [np.empty((height, size), dtype=storage) for _ in range(2 if READ_AHEAD else 1)]
            for storage in {spec.storage for spec in self.specs.values()}
        }

        def fill(i: int) -> np.ndarray:
            name, spec, start, stop = plan[i]
            pool = buffers[spec.storage]
            buf = pool[i % len(pool)]
            for r, index in enumerate(rows):
                self.files[index].read(name, start, buf[r, : stop - start])
            return buf

        if not READ_AHEAD:
            for i, (name, spec, start, stop) in enumerate(plan):
                yield name, spec, start, stop, fill(i)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="airfed-read") as pool:
            pending = pool.submit(fill, 0) if plan else None
            for i, (name, spec, start, stop) in enumerate(plan):
                assert pending is not None  # submitted for every i < len(plan)
                buf = pending.result()
                pending = pool.submit(fill, i + 1) if i + 1 < len(plan) else None
                try:
                    yield name, spec, start, stop, buf
                except GeneratorExit:
                    if pending is not None:
                        pending.cancel()
                    raise

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> UpdateSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_same_layout(ref_path: str, ref: dict[str, TensorSpec], path: str, specs: dict[str, TensorSpec]) -> None:
    missing, extra = sorted(set(ref) - set(specs)), sorted(set(specs) - set(ref))
    if missing or extra:
        raise ValueError(f"{path}: tensors differ from {ref_path}: missing {missing}, unexpected {extra}")
    for name, spec in ref.items():
        if specs[name] != spec:
            raise ValueError(
                f"{path}: tensor {name!r} is {specs[name].describe()}, {ref_path} has {spec.describe()}"
            )


class SafetensorsWriter:
    """Writes a safetensors file: the header first (every shape is known up front), then each
    tensor's data chunk by chunk at its offset, in any order."""

    def __init__(self, path: str | Path, layout: list[tuple[str, TensorSpec]], metadata: dict[str, str] | None = None):
        self.path = str(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._where: dict[str, tuple[int, TensorSpec]] = {}
        for name, spec in layout:
            nbytes = spec.numel * spec.storage.itemsize
            header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
            self._where[name] = (offset, spec)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._base = 8 + len(raw)
        self._size = offset
        self._written = 0
        self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._pos = self._base

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Write elements ``start:start+data.size`` of tensor ``name`` (in its stored dtype)."""
        offset, spec = self._where[name]
        if data.dtype != spec.storage or start < 0 or start + data.size > spec.numel:
            raise RuntimeError(f"bad write to {name!r}: {data.dtype}[{start}:{start + data.size}] of {spec.describe()}")
        pos = self._base + offset + start * spec.storage.itemsize
        if pos != self._pos:
            self._fh.seek(pos)
        chunk = np.ascontiguousarray(data).data.cast("B")
        self._fh.write(chunk)
        self._pos = pos + len(chunk)
        self._written += len(chunk)

    def close(self) -> None:
        self._fh.close()
        if self._written != self._size:
            Path(self.path).unlink(missing_ok=True)
            raise RuntimeError(f"{self.path}: incomplete output ({self._written} of {self._size} data bytes)")

    def abort(self) -> None:
        self._fh.close()
        Path(self.path).unlink(missing_ok=True)


@contextmanager
def writing(
    path: str | Path, layout: list[tuple[str, TensorSpec]], metadata: dict[str, str] | None = None
) -> Iterator[SafetensorsWriter]:
    """A :class:`SafetensorsWriter` that is removed again if the block fails."""
    writer = SafetensorsWriter(path, layout, metadata)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()


# -- dtype conversions (exact for every supported float dtype) ------------------------------------------
def decode(raw: np.ndarray, code: str, out: np.ndarray) -> None:
    """Stored values -> ``out`` (float64 or float32). BF16 is widened bitwise (exact)."""
    if code == "BF16":
        np.copyto(out, (raw.astype(np.uint32) << 16).view(np.float32), casting="unsafe")
    else:
        np.copyto(out, raw, casting="unsafe")


def encode(values: np.ndarray, code: str, out: np.ndarray) -> None:
    """Float values -> stored dtype: round to nearest for floats (BF16 round-to-nearest-even, as torch);
    integers and booleans are rounded half to even, as ``torch.round``."""
    if code in ("F64", "F32", "F16"):
        np.copyto(out, values, casting="unsafe")
    elif code == "BF16":
        f32 = values.astype(np.float32)
        bits = f32.view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        rounded[np.isnan(f32)] = 0x7FC0
        np.copyto(out, rounded)
    elif code == "BOOL":
        np.copyto(out, np.rint(values) != 0)
    else:
        np.copyto(out, np.rint(values), casting="unsafe")


# -- BLAS threads -------------------------------------------------------------------------------------
def _openblas_controls() -> list[tuple[Callable[[], int], Callable[[int], object]]]:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (Linux)."""
    controls: list[tuple[Callable[[], int], Callable[[int], object]]] = []
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split() for line in maps]
        libs = {f[-1] for f in fields if len(f) >= 6 and "openblas" in f[-1].lower() and ".so" in f[-1]}
    except OSError:
        return controls
    names = [
        ("openblas_get_num_threads", "openblas_set_num_threads"),
        ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
        ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
        ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ]
    for lib in sorted(libs):
        try:
            handle = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD if hasattr(os, "RTLD_NOLOAD") else 0)
        except OSError:
            continue
        for get_name, set_name in names:
            getter, setter = getattr(handle, get_name, None), getattr(handle, set_name, None)
            if getter is not None and setter is not None:
                getter.restype = ctypes.c_int
                controls.append((getter, setter))
                break
    return controls


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run NumPy's BLAS on one thread: the products here are small (N x chunk) and memory-bound, and
    on a shared machine BLAS worker threads spin against other processes. Also keeps reductions in a
    fixed order, so recomputing a round on the same kind of machine gives the same bytes."""
    np.empty(1) @ np.empty(1)  # make sure NumPy's BLAS is loaded
    controls = _openblas_controls()
    previous = [getter() for getter, _setter in controls]
    for _getter, setter in controls:
        setter(1)
    try:
        yield
    finally:
        for (_getter, setter), count in zip(controls, previous, strict=True):
            setter(count)
