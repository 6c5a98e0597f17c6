"""The kubernetes runner's rendered pods, executed: each container's argv + env runs locally in DAG
order and commits a round (the contract: a pod runs exactly what the local runner runs). The
containers run through the local runner's default launcher (warm: forked by a step server with the
container's argv and exactly its env, tests/fl_tasks/test_launch.py proves it equal to a fresh
interpreter); one local epoch, as the run only proves the contract. A real cluster end-to-end run is
gated on ``KUBECONFIG`` (see the README, "Running on Kubernetes").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from kubernetes_specs import kubernetes_spec_dict, write_spec

ROUND_MARK = "__AIRFED_ROUND__"


def container(pod) -> dict:
    return pod.manifest["spec"]["containers"][0]


def literal_env(pod) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(pod).get("env") or [] if "value" in e}


@pytest.fixture(scope="module")
def k8s_spec(tmp_path_factory):
    from airfed.spec import load_spec

    spec = kubernetes_spec_dict()
    spec["training"]["local-epochs"] = 1
    path = write_spec(tmp_path_factory.mktemp("k8s-spec"), spec)
    return load_spec(path), path


# -- (3) contract: the rendered containers, executed locally in DAG order ------------------------------
def test_rendered_containers_run_a_round_locally(k8s_spec, tmp_path):
    from airfed.cli.render import DEFAULT_RUN_ID
    from airfed.runners.pod_manifests import render_round

    from fl_tasks.contract import RESULT_FILE_ENV
    from fl_tasks.warm import WarmLauncher
    from fl_tasks.warm import run as run_step

    spec, path = k8s_spec
    pods = render_round(spec, round_number=ROUND_MARK, run_id=DEFAULT_RUN_ID)
    home = tmp_path / "home"
    store = tmp_path / "store"
    base_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),  # in the image, fl_tasks and examples are installed
        "AIRFED_HOME": str(home),
        "AIRFED_WARM_DIR": os.environ["AIRFED_WARM_DIR"],  # the session's step servers (stopped at its end)
    }

    launcher = WarmLauncher(fallback=False)
    local = {"AIRFED_STORE_URL": f"file://{store}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    prep: list[str] = []
    code = run_step(launcher, ["python", "-m", "fl_tasks.prepare_data", spec.step_payload()], base_env,
                    str(tmp_path), on_line=prep.append)
    assert code == 0, "\n".join(prep)

    def start(pod, round_value: str | None):
        c = container(pod)
        argv = [a.replace(ROUND_MARK, round_value) if round_value else a for a in [*c["command"], *c["args"]]]
        assert ROUND_MARK not in " ".join(argv)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        env = {**base_env, **literal_env(pod), **local}  # Secret refs (valueFrom/envFrom) can't resolve here
        result = tmp_path / "results" / f"{pod.step}-{pod.silo or 'server'}.json"
        if RESULT_FILE_ENV in env:
            env[RESULT_FILE_ENV] = str(result)
        return launcher.start(argv, env, str(tmp_path)), argv, result

    def run(step: str, round_value: str | None) -> list[Path]:
        started = [start(p, round_value) for p in pods if p.step == step]  # a step's pods at once
        for running, argv, _ in started:
            with running:
                out = list(running.lines())
                code = running.wait(600)
            assert code == 0, f"{step}: {' '.join(argv)}\n" + "\n".join(out[-60:])
        return [r for *_, r in started]

    (result,) = run("distribute", None)
    round_value = str(json.loads(result.read_text())["round"])
    assert round_value == "1"
    for step in ("train", "validate", "aggregate", "evaluate", "register"):
        run(step, round_value)

    head = json.loads((store / "digits" / "HEAD.json").read_text())
    assert head["round"] == 1
    assert (store / "digits" / "rounds" / "1" / "registry.json").exists()
    registered = json.loads((tmp_path / "results" / "register-server.json").read_text())
    assert registered  # the register pod's XCom result


# -- (4) a real cluster (gated) ------------------------------------------------------------------------
E2E_REQUIRED = ("AIRFED_K8S_STORE_URL", "AIRFED_K8S_MLFLOW_URI")


@pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="real-cluster test: set KUBECONFIG (see README)")
def test_one_round_on_a_real_cluster(tmp_path):
    """One round of the digits job as pods on the cluster of ``KUBECONFIG`` (connection kubernetes_default).

    Needs the fl-task image pullable by the cluster, an S3 store reachable from the pods and from
    here, and an MLflow tracking server reachable from the pods; see README "Running on Kubernetes".
    """
    missing = [name for name in E2E_REQUIRED if not os.environ.get(name)]
    if missing:
        pytest.skip(f"real-cluster test needs {', '.join(missing)} (see README)")
    namespace = os.environ.get("AIRFED_K8S_NAMESPACE", "default")
    secrets = [{"secret": s} for s in os.environ.get("AIRFED_K8S_STORE_SECRET", "").split(",") if s]
    server_secrets = secrets + [{"secret": s} for s in os.environ.get("AIRFED_K8S_MLFLOW_SECRET", "").split(",") if s]
    spec = yaml.safe_load((REPO / "dags" / "digits.yaml").read_text())
    env = {
        "AIRFED_STORE_URL": os.environ["AIRFED_K8S_STORE_URL"],
        "MLFLOW_TRACKING_URI": os.environ["AIRFED_K8S_MLFLOW_URI"],
    }
    if os.environ.get("AIRFED_K8S_S3_ENDPOINT"):
        env["AWS_ENDPOINT_URL"] = os.environ["AIRFED_K8S_S3_ENDPOINT"]
    spec.update(
        job="digits_k8s_e2e", registry={"model_name": "digits-k8s-e2e"}, runner="kubernetes",
        image=os.environ.get("AIRFED_K8S_IMAGE", "airfed/fl-task:latest"), env=env,
        placement={"namespace": namespace, "secrets": server_secrets},
    )
    for silo in spec["silos"]:
        silo["placement"] = {"namespace": namespace, "secrets": secrets}
    path = write_spec(tmp_path / "spec", spec)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFED_HOME", "AIRFLOW"))}
    run_env.update(AIRFED_HOME=str(tmp_path / "home"), AIRFED_STORE_URL=os.environ["AIRFED_K8S_STORE_URL"])
    proc = subprocess.run(
        [sys.executable, "-m", "airfed.cli", "run", str(path), "--rounds", "1", "--json"],
        capture_output=True, text=True, cwd=REPO, env=run_env, timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["state"] == "success" and summary["head_round"] >= 1
