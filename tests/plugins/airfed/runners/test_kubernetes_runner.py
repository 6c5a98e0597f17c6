"""The kubernetes runner, tested without a cluster: render every pod of a round with the provider's
own pod construction, validate the manifests against the Kubernetes schema, check placement,
secret handling, deadlines and deferral per silo, and parse the DAG the way Airflow does.
(The rendered containers' argv + env run a round in tests/e2e/test_kubernetes_pods.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml
from helpers import REPO
from kubernetes_specs import (
    FAKE_CREDENTIALS,
    IMAGE,
    K8S_VERSION,
    SERVER_PLACEMENT,
    SILO_PLACEMENTS,
    kubernetes_spec_dict,
    write_spec,
)

RUN_ID = "manual__2025-01-01T00:00:00+00:00"

@pytest.fixture(scope="module")
def k8s_spec(tmp_path_factory):
    from airfed.spec import load_spec

    path = write_spec(tmp_path_factory.mktemp("k8s-spec"), kubernetes_spec_dict())
    return load_spec(path), path


@pytest.fixture(scope="module")
def rendered(k8s_spec):
    """Every pod of round 1, rendered with fake credentials in the renderer's environment."""
    from airfed.runners.pod_manifests import render_round, to_yaml

    spec, path = k8s_spec
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_CREDENTIALS.items():
            mp.setenv(name, value)
        pods = render_round(spec, round_number=1, run_id=RUN_ID)
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
        assert "airfed/round-slot" not in meta["labels"]  # one DAG run per round: the run_id label says which
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
    from airfed.dag.builder import TEMPLATED_REFS
    from airfed.dag.step_calls import round_calls

    from fl_tasks.contract import RESULT_FILE_ENV

    spec, _ = k8s_spec
    calls = round_calls(spec, TEMPLATED_REFS)  # the DAG's calls, with its templates
    training = json.dumps(dict(spec.training), sort_keys=True)

    def resolved(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            arg = arg.replace(TEMPLATED_REFS.round, "1").replace(TEMPLATED_REFS.chain_id, RUN_ID)
            arg = arg.replace(TEMPLATED_REFS.run_id, RUN_ID).replace(TEMPLATED_REFS.training, training)
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
    assert "# train[us] | Airflow connection: k8s_us" in proc.stdout
    for value in FAKE_CREDENTIALS.values():
        assert value not in proc.stdout + proc.stderr
    # a local-runner spec renders only when asked for --runner kubernetes
    local = subprocess.run(
        [sys.executable, "-m", "airfed.cli", "render", str(REPO / "dags" / "digits.yaml")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert local.returncode == 2 and "--runner kubernetes" in local.stderr


# -- the DAG, as Airflow parses it ---------------------------------------------------------------------
def test_kubernetes_dag_parses_in_a_dagbag_with_mapped_pod_tasks(tmp_path):
    folder = tmp_path / "dags"
    write_spec(folder, {**kubernetes_spec_dict(), "kubernetes": {"deferrable": True}})
    shutil.copy(REPO / "dags" / "airfed_dags.py", folder)
    code = textwrap.dedent(
        f"""
        import json, sys
        from airflow.dag_processing.dagbag import DagBag
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.serialization.serialized_objects import DagSerialization
        bag = DagBag(dag_folder={str(folder)!r})
        dag = bag.dags["digits"]
        train = dag.get_task("train")
        distribute = dag.get_task("distribute")
        serialized = DagSerialization.to_dict(dag)
        task = next(t["__var"] for t in serialized["dag"]["tasks"] if t["__var"]["task_id"] == "train")
        def plain(value):
            if isinstance(value, dict):
                return plain(value["__var"]) if "__var" in value else {{k: plain(v) for k, v in value.items()}}
            return [plain(v) for v in value] if isinstance(value, list) else value
        print(json.dumps({{
            "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
            "mapped": type(train).__name__,
            "is_kpo": issubclass(train.operator_class, KubernetesPodOperator),
            "distribute_is_kpo": isinstance(distribute, KubernetesPodOperator),
            "xcom": distribute.do_xcom_push,
            "silos": [m["silo"] for m in train.expand_input.value],
            "conns": [m["placement"]["kubernetes_conn_id"] for m in train.expand_input.value],
            "deferrable": train.partial_kwargs.get("deferrable"),
            "map_index_template": train.partial_kwargs.get("map_index_template"),
            "serialized_placement": plain(task["expand_input"]["value"][0])["placement"],
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
    assert facts["deferrable"] is True  # kubernetes.deferrable in the spec: silo pods wait in the triggerer
    # the spec's placement as plain data in the serialized DAG, not stringified k8s objects
    assert facts["serialized_placement"] == SILO_PLACEMENTS["us"]
    assert facts["heavy"] == []


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


def test_every_pod_has_the_steps_deadline_and_silo_pods_defer_when_asked(k8s_spec, rendered):
    from airfed.dag.builder import TIMEOUT_GRACE_SECONDS, task_options
    from airfed.dag.step_calls import RoundRefs, round_calls
    from airfed.runners.kubernetes import step_pod_operators

    spec, _ = k8s_spec
    pods, _ = rendered
    for pod in pods:
        timeout = spec.execution.silo_timeout_seconds if pod.silo else spec.execution.server_timeout_seconds
        assert pod.manifest["spec"]["activeDeadlineSeconds"] == timeout + TIMEOUT_GRACE_SECONDS, pod.task_id
    deferred = spec.model_copy(update={"kubernetes": spec.kubernetes.model_copy(update={"deferrable": True})})
    calls = round_calls(deferred, RoundRefs("1", RUN_ID, RUN_ID, "{}"))
    for step in ("distribute", "train", "aggregate", "evaluate"):
        for op in step_pod_operators(deferred, step, calls[step], task_options(deferred, step)):
            assert op.deferrable is (step in ("train", "evaluate")), step
            assert op.active_deadline_seconds == int(task_options(deferred, step)["execution_timeout"].total_seconds())
    for op in step_pod_operators(spec, "train", calls["train"], task_options(spec, "train")):
        assert op.deferrable is False  # the default: silo pods hold their worker slot


def test_placement_is_converted_once_into_pod_arguments():
    from airfed.runners.kubernetes import placement_pod_kwargs
    from kubernetes.client import models as k8s

    from fl_tasks.spec import Placement

    kwargs = placement_pod_kwargs(Placement.model_validate({
        **SILO_PLACEMENTS["us"],
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}],
    }))
    assert kwargs["kubernetes_conn_id"] == "k8s_us" and kwargs["namespace"] == "fl-us"
    assert kwargs["tolerations"] == [k8s.V1Toleration(key="gpu", operator="Exists", effect="NoExecute",
                                                      toleration_seconds=30)]
    assert kwargs["container_resources"].limits == {"nvidia.com/gpu": "1", "memory": "8Gi"}
    assert [s.name for s in kwargs["image_pull_secrets"]] == ["regcred-us"]
    assert [(s.deploy_target, s.secret, s.key) for s in kwargs["secrets"]] == [
        ("AWS_ACCESS_KEY_ID", "us-store", "access-key"), ("AWS_SECRET_ACCESS_KEY", "us-store", "secret-key")]
    default = placement_pod_kwargs(Placement())
    assert default["kubernetes_conn_id"] == "kubernetes_default" and default["container_resources"] is None
