"""The warm step server's wire format and where its socket lives (stdlib only: both sides import it).

A connection carries length-prefixed JSON frames (4-byte big-endian length, then UTF-8 JSON).
The client's first frame is the request; the stdout/stderr pipe ends travel with it as SCM_RIGHTS
ancillary data, so the step writes straight into the caller's pipe (no output framing at all).

client → server   {"op": "run", "argv": [...], "env": {...}, "cwd": "..."}  + fds [stdout, stderr]
                  {"op": "ping"} | {"op": "stop"}
                  then, while the step runs: {"kill": <grace seconds>}; closing the connection
                  also kills the step
server → client   {"pid": <child pid>}   the step started (its own session: pgid == pid)
                  {"exit": <code>}       as subprocess.Popen.returncode (-N: killed by signal N)
                  {"error": "...", "retry": bool}   refused before starting anything
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")

#: Environment variables that shape a fresh interpreter's start-up or what its imports configure
#: (sys.path, hash seed, stdio encoding/buffering, thread pools sized when a library loads). A
#: forked child cannot re-apply them, so the server is keyed by them and started with them: a
#: request whose values differ goes to (or starts) another server, and every child sees exactly
#: what a fresh `python -m ...` with the request env would.
STARTUP_ENV_PREFIXES = (
    "PYTHON", "LC_", "LD_", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "GOTO_", "TORCH", "PYTORCH_", "CUDA_",
    "MALLOC_", "ARROW_", "JE_",
)
STARTUP_ENV_NAMES = ("LANG", "LANGUAGE", "HOME", "TZ", "VIRTUAL_ENV", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
#: Always passed to the server (not part of the key): where it lives and what a process needs.
SERVER_ENV_NAMES = ("PATH", "TMPDIR", "USER", "LOGNAME", "AIRFED_HOME")

_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def split_frames(buffer: bytearray) -> list[dict[str, Any]]:
    """Remove and return every complete frame at the start of ``buffer``."""
    frames = []
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
        if len(buffer) < _HEADER.size + size:
            break
        frames.append(json.loads(bytes(buffer[_HEADER.size:_HEADER.size + size])))
        del buffer[:_HEADER.size + size]
    return frames


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(message)
    if fds:
        sent = socket.send_fds(sock, [data], fds)  # fds ride on the first byte(s) of the frame
        data = data[sent:]
    if data:
        sock.sendall(data)


class FrameReader:
    """Blocking reader of frames from one socket (the client side)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.pending: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any] | None:
        """The next frame, or None at end of stream."""
        while not self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
            self.pending.extend(split_frames(self.buffer))
        return self.pending.pop(0)


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` that a fresh interpreter applies at start-up (the server's key)."""
    return {
        k: v for k, v in env.items()
        if k.startswith(STARTUP_ENV_PREFIXES) or k in STARTUP_ENV_NAMES
    }


def server_key(python: str, env: dict[str, str], cwd: str, preload: tuple[str, ...]) -> str:
    """One server per interpreter, start-up env, working directory and preload list."""
    material = json.dumps(
        {"python": python, "env": sorted(startup_env(env).items()), "cwd": cwd, "preload": list(preload)},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


#: Overrides where the sockets live (default ``$AIRFED_HOME/run``): e.g. one server for many homes.
RUN_DIR_ENV = "AIRFED_WARM_DIR"


def airfed_home(env: dict[str, str]) -> Path:
    return Path(env.get("AIRFED_HOME") or os.environ.get("AIRFED_HOME") or "~/.airfed").expanduser().resolve()


def run_dir(env: dict[str, str]) -> Path:
    """Where the warm servers of ``env`` listen: ``AIRFED_WARM_DIR``, else ``$AIRFED_HOME/run``."""
    chosen = env.get(RUN_DIR_ENV)
    return Path(chosen).expanduser().resolve() if chosen else airfed_home(env) / "run"


def _long_dir_prefix(directory: Path) -> Path:
    """Where the sockets of a directory whose own socket paths would be too long live instead."""
    dir_hash = hashlib.sha256(os.fsencode(directory)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"airfed-{os.getuid()}" / f"warm-{dir_hash}-"


def socket_path(directory: Path, key: str) -> Path:
    """``<directory>/warm-<key>.sock``; a private directory under /tmp if that path is too long."""
    path = directory / f"warm-{key}.sock"
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        return path
    prefix = _long_dir_prefix(directory)
    return prefix.with_name(f"{prefix.name}{key}.sock")


def socket_paths(directory: Path) -> list[Path]:
    """Every server socket of ``directory``, also those moved under /tmp (see ``socket_path``)."""
    prefix = _long_dir_prefix(directory)
    return sorted([*directory.glob("warm-*.sock"), *prefix.parent.glob(f"{prefix.name}*.sock")])


def private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) and refuse a directory another user controls."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    shared_tmp = path.parent == Path(tempfile.gettempdir())
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or (shared_tmp and st.st_mode & 0o077):
        raise PermissionError(f"{path} is not a private directory of this user")
