"""The example job end to end with its weights in S3 (moto's server on 127.0.0.1, minio SDK).

The example cut to 2 silos and 1 local epoch (``helpers.small_example_spec``): the run proves the S3
path, not the learning (tests/e2e/test_run.py runs the example as it ships).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, airfed_in_process, small_example_spec
from minio import Minio

BUCKET, PREFIX = "airfed", "test"
SILOS = ("us", "eu")


def run_cli(home: Path, s3_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_", "MLFLOW_", "AIRFLOW", "AWS_"))}
    env.update(s3_env)
    env.update({"AIRFED_HOME": str(home), "AIRFED_STORE_URL": f"s3://{BUCKET}/{PREFIX}"})
    return subprocess.run(
        [sys.executable, "-m", "airfed.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=1200
    )


def minio_client(s3_env: dict[str, str]) -> Minio:
    endpoint = s3_env["AWS_ENDPOINT_URL"].removeprefix("http://")
    return Minio(endpoint, access_key=s3_env["AWS_ACCESS_KEY_ID"], secret_key=s3_env["AWS_SECRET_ACCESS_KEY"],
                 secure=False)


def read(client: Minio, key: str) -> bytes:
    response = client.get_object(BUCKET, f"{PREFIX}/{key}")
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, tmp_path_factory, airflow_db):
    """``airfed run`` in the test process (the S3 path under test, not the process: test_run.py)."""
    root = tmp_path_factory.mktemp("s3")
    home, spec = root / "home", small_example_spec(root / "spec", silos=SILOS)
    proc = airfed_in_process(home, "run", str(spec), "--rounds", "2", "--json",
                             env_extra={**s3_endpoint, "AIRFED_STORE_URL": f"s3://{BUCKET}/{PREFIX}"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return home, json.loads(proc.stdout.strip().splitlines()[-1]), spec


def test_run_against_s3_commits_rounds_in_the_bucket(s3_run, s3_endpoint):
    home, summary, _spec = s3_run
    assert summary["store_url"] == f"s3://{BUCKET}/{PREFIX}"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    client = minio_client(s3_endpoint)
    listing = client.list_objects(BUCKET, prefix=PREFIX, recursive=True)
    keys = {o.object_name.removeprefix(f"{PREFIX}/") for o in listing}
    assert "digits/HEAD.json" in keys
    for r in (1, 2):
        assert {f"digits/rounds/{r}/plan.json", f"digits/rounds/{r}/global.safetensors",
                f"digits/rounds/{r}/result.json"} <= keys
        for silo in SILOS:
            assert {f"digits/rounds/{r}/updates/{silo}.safetensors", f"digits/rounds/{r}/updates/{silo}.json"} <= keys
    assert not (home / "store").exists()  # nothing went to the local store

    checked = 0
    for key in sorted(k for k in keys if k.endswith(".json")):
        record = json.loads(read(client, key))
        stack = [record]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                pairs = [(node.get("key"), node.get("sha256")), (node.get("global_key"), node.get("global_sha256")),
                         (node.get("result_key"), node.get("result_sha256"))]
                for ref, sha in pairs:
                    if isinstance(ref, str) and isinstance(sha, str):
                        assert hashlib.sha256(read(client, ref)).hexdigest() == sha, f"{ref} (from {key})"
                        checked += 1
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    assert checked >= 2 * len(SILOS) * 2


def test_credentials_never_reach_logs_or_mlflow(s3_run, s3_endpoint):
    home, _summary, _spec = s3_run
    secret = s3_endpoint["AWS_SECRET_ACCESS_KEY"]
    for log in (home / "logs").glob("*.log"):
        assert secret not in log.read_text()
    assert secret.encode() not in (home / "mlflow.db").read_bytes()


def test_tampered_update_fails_verify_naming_the_key(s3_run, s3_endpoint):
    home, _summary, spec_path = s3_run
    spec = str(spec_path)
    ok = run_cli(home, s3_endpoint, "verify", spec)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    client = minio_client(s3_endpoint)
    key = "digits/rounds/2/updates/eu.safetensors"
    data = bytearray(read(client, key))
    data[-1] ^= 0xFF
    client.put_object(BUCKET, f"{PREFIX}/{key}", io.BytesIO(bytes(data)), len(data),
                      content_type="application/octet-stream")
    bad = run_cli(home, s3_endpoint, "verify", spec)
    assert bad.returncode == 1
    assert key in bad.stdout + bad.stderr
