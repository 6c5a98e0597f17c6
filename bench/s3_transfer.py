"""Upload/download throughput and peak RSS: ``S3Store.put_file/get_file`` vs raw minio ``fput/fget_object``.

Each transfer runs in its own child process that reports its wall time and peak RSS (``VmHWM``,
see :func:`peak_rss_mb`); the S3 server (moto, unless ``AWS_ENDPOINT_URL`` is set) runs in a
separate process too, so the objects it keeps in memory do not count. Prints, for each direction::

    upload ours_MBps=.. minio_MBps=.. time_ratio=.. rss_ratio=.. ours_rss_mb=.. minio_rss_mb=..

``time_ratio`` = ours / minio wall time (below 1: ours is faster); ``rss_ratio`` = ours / minio peak
RSS. Ours also computes the sha256 on both paths (and verifies it on download); raw minio does not.

    python bench/s3_transfer.py --mb 1024
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from measure import peak_rss_mb  # bench/ is sys.path[0] when a benchmark runs

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
TENSOR_BYTES = 64 * MB


def write_safetensors(path: Path, size_mb: int) -> None:
    """A ``size_mb`` MiB safetensors file of float32 tensors, written in chunks (never all in memory)."""
    import numpy as np

    total = size_mb * MB
    sizes = [TENSOR_BYTES] * (total // TENSOR_BYTES) + ([total % TENSOR_BYTES] if total % TENSOR_BYTES else [])
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i, n in enumerate(sizes):
        header[f"layers.{i}.weight"] = {
            "dtype": "F32",
            "shape": [n // 4],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for n in sizes:
            for start in range(0, n, 16 * MB):
                out.write(rng.standard_normal((min(16 * MB, n - start) // 4,), dtype=np.float32).tobytes())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("moto server did not start")


def child(args: argparse.Namespace) -> None:
    """One transfer; print JSON {seconds, rss_mb, base_rss_mb}."""
    sys.path.insert(0, str(REPO))
    from minio import Minio

    from fl_tasks.store.s3 import S3Store, parse_endpoint

    if args.child.startswith("ours"):
        store = S3Store(args.bucket, "", part_size=args.part_mb * MB)
    else:
        netloc, secure, _ = parse_endpoint(os.environ["AWS_ENDPOINT_URL"])
        client = Minio(
            netloc,
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            secure=secure,
            region=os.environ.get("AWS_DEFAULT_REGION"),
        )
    base = peak_rss_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    if args.child == "ours-upload":
        store.put_file(args.key, args.file)
    elif args.child == "ours-download":
        store.get_file(args.key, args.out, args.sha256)
    elif args.child == "minio-upload":
        client.fput_object(args.bucket, args.key, args.file)
    elif args.child == "minio-download":
        client.fget_object(args.bucket, args.key, args.out)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "rss_mb": peak_rss_mb(), "base_rss_mb": base}))


def run_child(mode: str, **kw: str) -> dict:
    argv = [sys.executable, __file__, "--child", mode]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--part-mb", type=int, default=8, help="multipart part size of ours (MiB)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("file", "bucket", "key", "out", "sha256"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    server = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        server, endpoint = start_moto()
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench-secret",
            AWS_DEFAULT_REGION="us-east-1",
        )
    sys.path.insert(0, str(REPO))
    from fl_tasks.store.s3 import S3Store

    bucket = f"airfed-bench-{uuid.uuid4().hex[:8]}"
    store = S3Store(bucket)
    try:
        store.prepare()
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            src = Path(tmp) / "model.safetensors"
            write_safetensors(src, args.mb)
            sha = sha256_of(src)
            size_mb = src.stat().st_size / MB
            print(
                f"file={src.name} size_mb={size_mb:.0f} endpoint={os.environ['AWS_ENDPOINT_URL']} "
                f"part_mb(ours)={args.part_mb}",
                flush=True,
            )
            common = {"bucket": bucket, "part_mb": args.part_mb}
            results: dict[tuple[str, str], dict] = {}
            for _ in range(args.repeat):
                for who in ("ours", "minio"):
                    r = run_child(f"{who}-upload", file=src, key=f"{who}.safetensors", **common)
                    best = results.get(("upload", who))
                    if best is None or r["seconds"] < best["seconds"]:
                        results[("upload", who)] = r
                for who in ("ours", "minio"):
                    out = Path(tmp) / f"{who}.out"
                    r = run_child(f"{who}-download", key="ours.safetensors", out=out, sha256=sha, **common)
                    if sha256_of(out) != sha:
                        raise SystemExit(f"{who} download is corrupt")
                    out.unlink()
                    best = results.get(("download", who))
                    if best is None or r["seconds"] < best["seconds"]:
                        results[("download", who)] = r
        for direction in ("upload", "download"):
            ours, raw = results[(direction, "ours")], results[(direction, "minio")]
            fields = {
                "ours_MBps": f"{size_mb / ours['seconds']:.1f}",
                "minio_MBps": f"{size_mb / raw['seconds']:.1f}",
                "time_ratio": f"{ours['seconds'] / raw['seconds']:.2f}",
                "rss_ratio": f"{ours['rss_mb'] / raw['rss_mb']:.2f}",
                "ours_rss_mb": f"{ours['rss_mb']:.0f}",
                "minio_rss_mb": f"{raw['rss_mb']:.0f}",
                "ours_cpu_s": f"{ours['cpu_s']:.1f}",
                "minio_cpu_s": f"{raw['cpu_s']:.1f}",
                "ours_base_rss_mb": f"{ours['base_rss_mb']:.0f}",
                "minio_base_rss_mb": f"{raw['base_rss_mb']:.0f}",
            }
            print(direction, " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
