"""The digits job on the kubernetes runner, each silo in its own cluster and namespace (test data).

Shared by the kubernetes runner's unit tests and the end-to-end run of its rendered pods.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import REPO

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
