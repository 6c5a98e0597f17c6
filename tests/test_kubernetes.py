"""The kubernetes runner, tested without a cluster: render every pod of a round with the provider's
own pod construction, validate the manifests against the Kubernetes schema, check placement and
secret handling per silo, and execute the rendered containers' argv + env locally in DAG order.
A real-cluster end-to-end run is gated on ``KUBECONFIG`` (see the README, "Running on Kubernetes").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: A schema version kubernetes-validate ships (it has 1.2x .. 1.37).
K8S_VERSION = "1.34.0"
IMAGE = "registry.example.com/airfed/fl-task:0.1.0"
ROUND_MARK = "__AIRFED_ROUND__"
#: Credential values present in the environment of whoever renders/builds the DAG: none may leak.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAAIRFEDTESTFAKE01",
    "AWS_SECRET_ACCESS_KEY": "airfed-fake-secret-7c1e9f0b2d",
    "MLFLOW_TRACKING_PASSWORD": "airfed-fake-mlflow-pw-41aa",
    "MLFLOW_TRACKING_TOKEN": "airfed-fake-mlflow-token-93bd",
}

SERVER_PLACEMENT = {
    "kubernetes_conn_id": "k8s_server",
    "namespace": "fl-server",
    "service_account_name": "airfed-server",
    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "secrets": [
        {"secret": "fl-store-credentials"},  # every key as env (envFrom)
        {"secret": "mlflow-credentials", "key": "token", "env": "MLFLOW_TRACKING_TOKEN"},
    ],
}
SILO_PLACEMENTS = {
    "us": {
        "kubernetes_conn_id": "k8s_us",
        "namespace": "fl-us",
        "service_account_name": "silo-us",
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
        "image_pull_secrets": ["regcred-us"],
        "secrets": [
            {"secret": "us-store", "key": "access-key", "env": "AWS_ACCESS_KEY_ID"},
            {"secret": "us-store", "key": "secret-key", "env": "AWS_SECRET_ACCESS_KEY"},
        ],
    },
    "eu": {
        "kubernetes_conn_id": "k8s_eu",
        "namespace": "fl-eu",
        "node_selector": {"topology.kubernetes.io/region": "eu-west-1"},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "secrets": [{"secret": "eu-store"}],
        "volumes": [{"name": "silo-data", "persistentVolumeClaim": {"claimName": "eu-digits", "readOnly": True}}],
        "volume_mounts": [{"name": "silo-data", "mountPath": "/data", "readOnly": True}],
    },
    "asia": {
        "kubernetes_conn_id": "k8s_asia",
        "namespace": "fl-asia",
        "service_account_name": "silo-asia",
        "image_pull_secrets": ["regcred-asia", "regcred-mirror"],
        "secrets": [{"secret": "asia-store"}],
    },
}


def kubernetes_spec_dict() -> dict:
    """dags/digits.yaml on the kubernetes runner, each silo in its own cluster and namespace."""
    spec = yaml.safe_load((REPO / "dags" / "digits.yaml").read_text())
    spec.update(
        runner="kubernetes",
        image=IMAGE,
        description="Digits on Kubernetes; {{ braces }} in the spec stay literal, as in the local runner.",
        env={
            "AIRFED_STORE_URL": "s3://fl-store/airfed",
            "AWS_ENDPOINT_URL": "https://minio.fl-server.svc:9000",
            "MLFLOW_TRACKING_URI": "http://mlflow.fl-server.svc:5000",
        },
        placement=SERVER_PLACEMENT,
    )
    for silo in spec["silos"]:
        silo["placement"] = SILO_PLACEMENTS[silo["name"]]
        silo["env"] = {"AIRFED_SILO_ZONE": f"zone-{silo['name']}"}
    return spec


def write_spec(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "digits.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def k8s_spec(tmp_path_factory):
    from airfed.spec_loader import load_spec

    path = write_spec(tmp_path_factory.mktemp("k8s-spec"), kubernetes_spec_dict())
    return load_spec(path), path


@pytest.fixture(scope="module")
def rendered(k8s_spec):
    """Every pod of round slot 1, rendered with fake credentials in the renderer's environment."""
    from airfed.render import render_round, to_yaml

    spec, path = k8s_spec
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_CREDENTIALS.items():
            mp.setenv(name, value)
        pods = render_round(spec, path, round_number=1)
        text = to_yaml(pods)
    return pods, text


def container(pod) -> dict:
    return pod.manifest["spec"]["containers"][0]


def literal_env(pod) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(pod).get("env") or [] if "value" in e}


# -- (1) schema ------------------------------------------------------------------------------------
def test_every_pod_validates_strictly_against_the_kubernetes_schema(rendered):
    import kubernetes_validate

    pods, text = rendered
    assert [p.step for p in pods] == ["distribute"] + ["train"] * 3 + ["validate"] * 3 + ["aggregate"] + [
        "evaluate"] * 3 + ["register"]
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == len(pods) == 12
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # strict really is strict: an unknown field fails
    broken = json.loads(json.dumps(docs[1]))
    broken["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# -- (2) placement, argv/env identity, secrets --------------------------------------------------------
def test_each_silo_pod_carries_its_own_placement(rendered):
    pods, _ = rendered
    for pod in pods:
        spec, meta, c = pod.manifest["spec"], pod.manifest["metadata"], container(pod)
        assert c["image"] == IMAGE
        assert meta["labels"]["airfed/job"] == "digits"
        assert meta["labels"]["airfed/step"] == pod.step
        assert meta["labels"]["airfed/round-slot"] == "1"
        assert spec["restartPolicy"] == "Never"
        want = SILO_PLACEMENTS[pod.silo] if pod.silo else SERVER_PLACEMENT
        assert pod.conn_id == want["kubernetes_conn_id"]
        assert meta["namespace"] == want["namespace"]
        assert spec.get("serviceAccountName") == want.get("service_account_name")
        assert (spec.get("nodeSelector") or {}) == want.get("node_selector", {})
        assert (spec.get("tolerations") or []) == want.get("tolerations", [])
        resources = c.get("resources") or {}
        for kind, values in want.get("resources", {}).items():
            assert resources[kind] == {k: str(v) for k, v in values.items()}, (pod.task_id, pod.silo)
        assert [s["name"] for s in spec.get("imagePullSecrets") or []] == want.get("image_pull_secrets", [])
        if pod.silo:
            assert meta["labels"]["airfed/silo"] == pod.silo
            assert pod.manifest["metadata"]["name"].startswith(f"digits-{pod.step}-{pod.silo}-")
    gpu = [p for p in pods if p.silo == "us"]
    assert gpu and all(container(p)["resources"]["limits"]["nvidia.com/gpu"] == "1" for p in gpu)


def test_secrets_are_references_and_no_credential_value_reaches_a_manifest(rendered):
    pods, text = rendered
    for value in FAKE_CREDENTIALS.values():
        assert value not in text
    for pod in pods:
        c = container(pod)
        want = (SILO_PLACEMENTS[pod.silo] if pod.silo else SERVER_PLACEMENT)["secrets"]
        key_refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env") or [] if "valueFrom" in e
        }
        assert key_refs == {s["env"]: {"name": s["secret"], "key": s["key"]} for s in want if "key" in s}
        env_from = [e["secretRef"]["name"] for e in c.get("envFrom") or []]
        assert env_from == [s["secret"] for s in want if "key" not in s]
        # no literal env carries anything credential-like
        assert not [n for n in literal_env(pod) if any(w in n for w in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY"))]
    # silos get no MLflow credentials (only server steps talk to MLflow)
    assert "mlflow-credentials" not in json.dumps([p.manifest for p in pods if p.silo])


def test_pods_run_the_stepcalls_argv_and_env(rendered, k8s_spec):
    from airfed.calls import round_calls
    from airfed.render import DEFAULT_RUN_ID

    from fl_tasks.contract import RESULT_FILE_ENV

    spec, _ = k8s_spec
    calls = round_calls(spec, 1)
    training = json.dumps(dict(spec.training), sort_keys=True)

    def resolved(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            arg = arg.replace("{{ ti.xcom_pull(task_ids='round_1.distribute')['round'] }}", "1")
            arg = arg.replace("{{ run_id }}", DEFAULT_RUN_ID).replace("{{ params.training | tojson }}", training)
            out.append(arg)
        return out

    for pod in rendered[0]:
        call = calls[pod.step]
        if isinstance(call, list):
            call = next(c for c in call if c.silo == pod.silo)
        c = container(pod)
        assert [*c["command"], *c["args"]] == resolved(call.argv)
        env = literal_env(pod)
        if pod.silo:
            assert env == call.env
            assert len(pod.manifest["spec"]["containers"]) == 1  # no xcom sidecar in silo clusters
        else:  # server steps hand their result to the provider's xcom sidecar
            assert env == {**call.env, RESULT_FILE_ENV: "/airflow/xcom/return.json"}
            names = [x["name"] for x in pod.manifest["spec"]["containers"]]
            assert names == ["base", "airflow-xcom-sidecar"]
            assert {"name": "xcom", "mountPath": "/airflow/xcom"} in c["volumeMounts"]


def test_render_cli_prints_only_yaml(k8s_spec, tmp_path):
    _, path = k8s_spec
    env = {**os.environ, **FAKE_CREDENTIALS, "AIRFED_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "airfed.cli", "render", str(path)], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [d["metadata"]["labels"]["airfed/step"] for d in docs][:2] == ["distribute", "train"]
    assert len(docs) == 12 and all(d["kind"] == "Pod" for d in docs)
    assert "# round_1.train[us] | Airflow connection: k8s_us" in proc.stdout
    for value in FAKE_CREDENTIALS.values():
        assert value not in proc.stdout + proc.stderr
    # a local-runner spec renders only when asked for --runner kubernetes
    local = subprocess.run(
        [sys.executable, "-m", "airfed.cli", "render", str(REPO / "dags" / "digits.yaml")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert local.returncode == 2 and "--runner kubernetes" in local.stderr


# -- (3) contract: the rendered containers, executed locally in DAG order ------------------------------
def test_rendered_containers_run_a_round_locally(k8s_spec, tmp_path):
    from airfed.render import render_round

    from fl_tasks.contract import RESULT_FILE_ENV

    spec, path = k8s_spec
    pods = render_round(spec, path, round_number=ROUND_MARK)
    home = tmp_path / "home"
    store = tmp_path / "store"
    base_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),  # in the image, fl_tasks and examples are installed
        "AIRFED_HOME": str(home),
    }
    local = {"AIRFED_STORE_URL": f"file://{store}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    prep = subprocess.run(
        [sys.executable, "-m", "fl_tasks.prepare_data", spec.step_payload()],
        env=base_env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert prep.returncode == 0, prep.stdout + prep.stderr

    def start(pod, round_value: str | None) -> tuple[subprocess.Popen, Path]:
        c = container(pod)
        argv = [a.replace(ROUND_MARK, round_value) if round_value else a for a in [*c["command"], *c["args"]]]
        assert ROUND_MARK not in " ".join(argv)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        env = {**base_env, **literal_env(pod), **local}  # Secret refs (valueFrom/envFrom) can't resolve here
        result = tmp_path / "results" / f"{pod.step}-{pod.silo or 'server'}.json"
        if RESULT_FILE_ENV in env:
            env[RESULT_FILE_ENV] = str(result)
        proc = subprocess.Popen(
            argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return proc, result

    def run(step: str, round_value: str | None) -> list[Path]:
        started = [start(p, round_value) for p in pods if p.step == step]
        for proc, _ in started:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{step}: {' '.join(proc.args)}\n{out[-4000:]}"
        return [r for _, r in started]

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


# -- the DAG, as Airflow parses it ---------------------------------------------------------------------
def test_kubernetes_dag_parses_in_a_dagbag_with_mapped_pod_tasks(tmp_path):
    folder = tmp_path / "dags"
    write_spec(folder, kubernetes_spec_dict())
    shutil.copy(REPO / "dags" / "airfed_dags.py", folder)
    code = textwrap.dedent(
        f"""
        import json, sys
        from airflow.dag_processing.dagbag import DagBag
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.serialization.serialized_objects import DagSerialization
        bag = DagBag(dag_folder={str(folder)!r})
        dag = bag.dags["digits"]
        train = dag.get_task("round_1.train")
        distribute = dag.get_task("round_1.distribute")
        serialized = DagSerialization.to_dict(dag)
        task = next(t["__var"] for t in serialized["dag"]["tasks"] if t["__var"]["task_id"] == "round_1.train")
        print(json.dumps({{
            "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
            "mapped": type(train).__name__,
            "is_kpo": issubclass(train.operator_class, KubernetesPodOperator),
            "distribute_is_kpo": isinstance(distribute, KubernetesPodOperator),
            "xcom": distribute.do_xcom_push,
            "silos": [m["silo"] for m in train.expand_input.value],
            "conns": [m["kubernetes_conn_id"] for m in train.expand_input.value],
            "map_index_template": train.partial_kwargs.get("map_index_template"),
            "serialized_secret_refs": task["expand_input"]["value"][0]["__var"]["secret_refs"],
            "heavy": sorted(m for m in ("torch", "flwr", "mlflow", "examples.digits.client_app") if m in sys.modules),
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in FAKE_CREDENTIALS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["errors"] == {}
    assert facts["mapped"] == "MappedOperator" and facts["is_kpo"] and facts["distribute_is_kpo"]
    assert facts["xcom"] is True
    assert facts["silos"] == ["us", "eu", "asia"]
    assert facts["conns"] == ["k8s_us", "k8s_eu", "k8s_asia"]
    assert facts["map_index_template"] == "{{ task.silo }}"
    # plain data in the serialized DAG, not stringified k8s objects
    assert [r["__var"] if "__var" in r else r for r in facts["serialized_secret_refs"]] == [
        {"secret": "us-store", "key": "access-key", "env": "AWS_ACCESS_KEY_ID"},
        {"secret": "us-store", "key": "secret-key", "env": "AWS_SECRET_ACCESS_KEY"},
    ]
    assert facts["heavy"] == []


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


def test_silo_data_volumes_are_mounted_where_the_spec_says(rendered):
    pods, _text = rendered
    eu_pods = [p for p in pods if p.manifest["metadata"]["labels"].get("airfed/silo") == "eu"]
    assert {p.manifest["metadata"]["labels"]["airfed/step"] for p in eu_pods} == {"train", "validate", "evaluate"}
    for pod in eu_pods:
        volumes = {v["name"]: v for v in pod.manifest["spec"]["volumes"]}
        assert volumes["silo-data"]["persistentVolumeClaim"] == {"claimName": "eu-digits", "readOnly": True}
        mounts = {m["name"]: m for m in container(pod)["volumeMounts"]}
        assert mounts["silo-data"] == {"name": "silo-data", "mountPath": "/data", "readOnly": True}
    other = [p for p in pods if p.manifest["metadata"]["labels"].get("airfed/silo") == "us"]
    assert all("silo-data" not in str(p.manifest["spec"].get("volumes")) for p in other)
