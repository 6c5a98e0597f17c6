"""The Helm chart (helm/airfed) and the official Airflow chart's values (helm/airflow-values.yaml),
tested offline: lint and render the chart with Helm's own library (helm-python-sdk), for the default
values and the multi-silo example, and validate every rendered manifest against the Kubernetes
schema (kubernetes-validate, strict). Then check what matters for a deployment: the pod-runner RBAC
is exactly what the KubernetesPodOperator needs, every silo gets its namespace / service account /
credentials Secret, no credential appears unless it was given, values.schema.json rejects bad
values, the dags ConfigMap carries the loader and specs in a layout Airflow can walk, the example
job spec refers to objects the chart creates, and the Airflow values agree with the chart.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = REPO / "helm" / "airfed"
MULTI_SILO = CHART / "ci" / "multi-silo-values.yaml"
AIRFLOW_VALUES = REPO / "helm" / "airflow-values.yaml"
#: A schema version kubernetes-validate ships (it has 1.25 .. 1.37); the same as test_kubernetes.
K8S_VERSION = "1.34.0"
RELEASE = "airfed"
NOTES = "NOTES.txt"

#: The pod-runner Role: exactly the KubernetesPodOperator's calls (see templates/rbac.yaml).
POD_RUNNER_RULES = {
    "pods": {"create", "get", "list", "watch", "delete", "patch"},
    "pods/log": {"get"},
    "pods/exec": {"create", "get"},
    "events": {"get", "list"},
}
EXPECTED_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap", "Deployment", "Service"}


# -- helpers ---------------------------------------------------------------------------------------
class Rendered:
    """One render of the chart: the manifests as dicts, and NOTES.txt."""

    def __init__(self, outputs: dict[str, str]) -> None:
        self.raw = outputs
        self.notes = next((text for path, text in outputs.items() if path.endswith(NOTES)), "")
        self.docs: list[dict] = []
        for path, text in sorted(outputs.items()):
            if path.endswith(NOTES):
                continue
            self.docs.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def of(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        for doc in self.of(kind):
            meta = doc["metadata"]
            if meta["name"] == name and (namespace is None or meta.get("namespace") == namespace):
                return doc
        return None

    def manifest_text(self) -> str:
        return "\n".join(text for path, text in self.raw.items() if not path.endswith(NOTES))


def load_values(path: Path) -> dict:
    """A values file parsed the way `helm -f` parses it (Helm's own YAML reader)."""
    return helm.values_from_yaml(path.read_text())


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def multi_values() -> dict:
    return load_values(MULTI_SILO)


def render(chart, values: dict | None) -> Rendered:
    return Rendered(chart.render(values, name=RELEASE, namespace="airfed"))


@pytest.fixture(scope="module")
def default_render(chart) -> Rendered:
    return render(chart, None)


@pytest.fixture(scope="module")
def multi_render(chart, multi_values) -> Rendered:
    return render(chart, multi_values)


CASES = ["default", "multi-silo"]


@pytest.fixture(params=CASES)
def case(request, default_render, multi_render, multi_values) -> tuple[str, dict | None, Rendered]:
    if request.param == "default":
        return "default", None, default_render
    return "multi-silo", multi_values, multi_render


# -- lint and schema-valid manifests --------------------------------------------------------------
def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "airfed"
    assert chart.schema is not None and chart.schema["$schema"].endswith("draft-07/schema#")
    for template in ("templates/_helpers.tpl", "templates/NOTES.txt"):
        assert template in {t["name"] for t in chart.templates}


@pytest.mark.parametrize("name", CASES)
def test_lint_is_clean(name, multi_values):
    values = None if name == "default" else multi_values
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{K8S_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert report["errors"] == [] and problems == [], report


def test_every_manifest_is_valid_kubernetes(case):
    name, _, rendered = case
    assert rendered.docs, name
    for doc in rendered.docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace") or doc["kind"] == "Namespace", doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "airfed"
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in rendered.docs]
    assert len(keys) == len(set(keys)), f"duplicate objects would make `helm install` fail: {keys}"


def test_multi_silo_render_covers_every_kind(multi_render):
    assert {d["kind"] for d in multi_render.docs} == EXPECTED_KINDS


# -- RBAC -------------------------------------------------------------------------------------------
def test_rbac_is_exactly_the_pod_runner_set(case):
    name, values, rendered = case
    values = values or {}
    job_ns = values.get("jobNamespace", {}).get("name", "airfed")
    silo_ns = {s.get("namespace") or f"{RELEASE}-{s['name']}" for s in values.get("silos", [])}
    roles = rendered.of("Role")
    assert {r["metadata"]["namespace"] for r in roles} == {job_ns} | silo_ns
    assert len(roles) == len({job_ns} | silo_ns), "one Role per namespace, even when silos share one"
    for role in roles:
        verbs: dict[str, set[str]] = {}
        for rule in role["rules"]:
            assert rule["apiGroups"] == [""], rule
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for resource in rule["resources"]:
                verbs.setdefault(resource, set()).update(rule["verbs"])
        assert verbs == POD_RUNNER_RULES, role["metadata"]
        assert not any("*" in v for v in verbs.values())
    assert rendered.of("ClusterRole") == [] and rendered.of("ClusterRoleBinding") == []

    airflow = values.get("airflow", {"namespace": "airflow", "serviceAccount": {"name": "airflow-worker"}})
    subject = {"kind": "ServiceAccount", "name": airflow["serviceAccount"]["name"], "namespace": airflow["namespace"]}
    bindings = rendered.of("RoleBinding")
    assert len(bindings) == len(roles)
    for binding in bindings:
        role = rendered.get("Role", binding["roleRef"]["name"], binding["metadata"]["namespace"])
        assert role is not None and binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0] == subject
        assert binding["subjects"][1:] == values.get("rbac", {}).get("extraSubjects", [])


# -- silos: namespaces, service accounts, credentials ---------------------------------------------
def test_each_silo_gets_namespace_service_account_and_secret(multi_render, multi_values):
    r = multi_render
    created_ns = {d["metadata"]["name"] for d in r.of("Namespace")}
    assert "fl-server" in created_ns
    assert r.get("ServiceAccount", "airfed-server", "fl-server") is not None
    for silo in multi_values["silos"]:
        ns = silo["namespace"]
        assert (ns in created_ns) == silo.get("createNamespace", True), silo["name"]
        sa_name = silo.get("serviceAccount", {}).get("name") or f"{RELEASE}-silo-{silo['name']}"
        sa = r.get("ServiceAccount", sa_name, ns)
        assert sa is not None, silo["name"]
        assert sa["automountServiceAccountToken"] is False
        assert sa["metadata"]["labels"]["airfed/silo"] == silo["name"]
        assert sa["metadata"].get("annotations", {}) == silo.get("serviceAccount", {}).get("annotations", {})

        creds = silo.get("storeCredentials", {})
        default_secret = f"{RELEASE}-store-{silo['name']}"
        secret = r.get("Secret", default_secret, ns)
        if creds.get("accessKeyId"):
            assert secret is not None and set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert f"secrets: [{{secret: {default_secret}}}]" in r.notes
        else:
            assert secret is None, f"{silo['name']}: no Secret unless credentials are given"
            expected = creds.get("existingSecret") or default_secret
            assert f"secrets: [{{secret: {expected}}}]" in r.notes
            if not creds.get("existingSecret"):  # NOTES says what to create
                assert f"kubectl -n {ns} create secret generic {default_secret}" in r.notes
        assert f"service_account_name: {sa_name}" in r.notes
    # The placement fields documented per silo reach the NOTES' spec snippet.
    assert '"nvidia.com/gpu.present":"true"' in r.notes and "kubernetes_conn_id: k8s_eu" in r.notes
    # Every namespace is marked to survive `helm uninstall` and enforces the restricted profile.
    for ns in r.of("Namespace"):
        assert ns["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert r.get("Namespace", "fl-server")["metadata"]["labels"]["team"] == "ml-platform"


def _given_secrets(values: dict) -> set[str]:
    found: set[str] = set()
    for creds in [values.get("jobNamespace", {}).get("storeCredentials", {})] + [
        s.get("storeCredentials", {}) for s in values.get("silos", [])
    ]:
        found.update(v for k, v in creds.items() if k != "existingSecret" and v)
    mlflow = values.get("mlflow", {})
    found.update(v for v in [mlflow.get("backendStoreUri"), *mlflow.get("s3", {}).values()] if v)
    return found


def test_no_credentials_in_output_unless_given(default_render, multi_render, multi_values):
    # Default values carry no credentials, so nothing secret is rendered at all.
    assert default_render.of("Secret") == []
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _given_secrets(defaults) == set()

    # With values given, each appears only base64-encoded inside a Secret's data, never elsewhere.
    given = _given_secrets(multi_values)
    assert len(given) == 7
    secret_values = set()
    for secret in multi_render.of("Secret"):
        assert "stringData" not in secret
        secret_values.update(base64.b64decode(v).decode() for v in secret["data"].values())
    assert secret_values == given
    others = [d for d in multi_render.docs if d["kind"] != "Secret"]
    plain = json.dumps(others) + multi_render.notes
    for value in given:
        assert value not in plain and base64.b64encode(value.encode()).decode() not in plain
    # The Deployment refers to its credentials only through secretKeyRef.
    env = _mlflow_container(multi_render)["env"]
    assert all("value" not in e for e in env if e["name"].startswith(("AWS_ACCESS", "AWS_SECRET", "MLFLOW_BACKEND")))


def test_set_file_credentials_are_trimmed(chart, tmp_path):
    """`--set-file` keeps a file's trailing newline; the Secrets hold the bare values."""
    (tmp_path / "id").write_text("AKIDFROMFILE\n")
    (tmp_path / "key").write_text("secret-from-file\n")
    (tmp_path / "db").write_text("postgresql://mlflow:pw@db:5432/mlflow\n")
    values = helm.parse_set_file(
        f"jobNamespace.storeCredentials.accessKeyId={tmp_path / 'id'},"
        f"jobNamespace.storeCredentials.secretAccessKey={tmp_path / 'key'},"
        f"mlflow.backendStoreUri={tmp_path / 'db'}"
    )
    assert values["jobNamespace"]["storeCredentials"]["accessKeyId"] == "AKIDFROMFILE\n"
    rendered = render(chart, values)
    store = rendered.get("Secret", f"{RELEASE}-store", "airfed")
    decoded = {k: base64.b64decode(v).decode() for k, v in store["data"].items()}
    assert decoded == {"AWS_ACCESS_KEY_ID": "AKIDFROMFILE", "AWS_SECRET_ACCESS_KEY": "secret-from-file"}
    mlflow = rendered.get("Secret", f"{RELEASE}-mlflow", "airfed")
    assert set(mlflow["data"]) == {"MLFLOW_BACKEND_STORE_URI"}
    assert base64.b64decode(mlflow["data"]["MLFLOW_BACKEND_STORE_URI"]).decode() == "postgresql://mlflow:pw@db:5432/mlflow"
    assert "kubectl -n airfed create secret" not in rendered.notes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"silos": [{"name": "us", "storeCredentials": {"accessKeyId": "only-half"}}]}, "silos[0] (us)"),
        ({"jobNamespace": {"storeCredentials": {"existingSecret": "x", "accessKeyId": "a", "secretAccessKey": "b"}}},
         "not both"),
        ({"silos": [{"name": "us"}, {"name": "us"}]}, "duplicate silo name"),
        ({"mlflow": {"s3": {"accessKeyId": "a", "secretAccessKey": "b"}}}, "without mlflow.backendStoreUri"),
    ],
)
def test_inconsistent_credentials_fail_the_render(chart, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name=RELEASE)


# -- values.schema.json -----------------------------------------------------------------------------
BAD_VALUES = {
    "silo without name": {"silos": [{"namespace": "fl-us"}]},
    "silo name not a DNS label": {"silos": [{"name": "US_East"}]},
    "store url not s3": {"store": {"url": "http://minio:9000/bucket"}},
    "unknown top-level key": {"minio": {"enabled": True}},
    "job file not yaml": {"jobs": {"digits.txt": "job: digits"}},
    "job spec not text": {"jobs": {"digits.yaml": {"job": "digits"}}},
    "bad pod security level": {"namespaces": {"podSecurity": "strict"}},
}


@pytest.mark.parametrize("label", sorted(BAD_VALUES))
def test_schema_rejects_bad_values_in_helm(chart, label):
    """Helm itself enforces values.schema.json: on render (as install/template do) and on lint."""
    values = BAD_VALUES[label]
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE)
    assert helm.lint(CHART, values)["errors"], label


def test_schema_is_draft7_and_agrees_with_jsonschema(chart, multi_values):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert list(validator.iter_errors(chart.merge_values(None))) == []
    assert list(validator.iter_errors(chart.merge_values(multi_values))) == []
    chart.validate_schema(multi_values)
    for label, bad in BAD_VALUES.items():
        assert list(validator.iter_errors(chart.merge_values(bad))), label
    missing_name = next(validator.iter_errors(chart.merge_values(BAD_VALUES["silo without name"])))
    assert "'name' is a required property" in missing_name.message


# -- the dags ConfigMap -----------------------------------------------------------------------------
def test_dags_configmap_carries_loader_and_specs(default_render, multi_render, multi_values):
    loader = (REPO / "dags" / "airfed_dags.py").read_text()
    assert (CHART / "files" / "airfed_dags.py").read_text() == loader, "helm/airfed/files/ copy is stale"
    default_cm = default_render.get("ConfigMap", "airfed-dags", "airflow")
    assert set(default_cm["data"]) == {".airflowignore", "airfed_dags.py"}
    cm = multi_render.get("ConfigMap", "airfed-dags", "airflow")
    assert cm["data"]["airfed_dags.py"] == loader
    assert set(cm["data"]) == {".airflowignore", "airfed_dags.py", *multi_values["jobs"]}
    for file, text in multi_values["jobs"].items():
        assert cm["data"][file] == text, file


def test_configmap_volume_layout_is_walkable_by_airflow(multi_render, tmp_path):
    """A ConfigMap volume is `..<timestamp>/` + a `..data` symlink + top-level links to it. Airflow
    follows symlinks when it lists the dags folder and stops at the second path to the same
    directory; the chart's .airflowignore hides both, leaving exactly the loader."""
    file_utils = pytest.importorskip("airflow.utils.file")
    data = multi_render.get("ConfigMap", "airfed-dags", "airflow")["data"]
    real = tmp_path / "..2026_01_01_00_00_00.000000001"
    real.mkdir()
    for name, text in data.items():
        (real / name).write_text(text)
    (tmp_path / "..data").symlink_to(real.name)
    for name in data:
        (tmp_path / name).symlink_to(f"..data/{name}")

    found = file_utils.list_py_file_paths(tmp_path, safe_mode=True)
    assert found == [str(tmp_path / "airfed_dags.py")]

    # The loader reads specs next to itself (non-recursively): it sees the top-level links.
    from airfed.spec import find_specs

    assert [p.name for p in find_specs(tmp_path)] == sorted(multi_render.get(
        "ConfigMap", "airfed-dags", "airflow")["data"].keys() - {".airflowignore", "airfed_dags.py"})

    (tmp_path / ".airflowignore").unlink()
    with pytest.raises(RuntimeError, match="recursive loop"):
        file_utils.list_py_file_paths(tmp_path, safe_mode=True)


def test_example_job_spec_matches_what_the_chart_creates(multi_render, multi_values):
    """The CI job spec is valid for airfed and each placement names objects this release provides."""
    from airfed.spec import parse_spec_text

    for file, text in multi_values["jobs"].items():
        spec = parse_spec_text(text, file)
        assert spec.runner == "kubernetes"
        placements = [(spec.placement, None)] + [(s.placement, s.name) for s in spec.silos]
        for placement, silo in placements:
            ns = placement.namespace
            assert multi_render.get("Role", f"{RELEASE}-pod-runner", ns) is not None, (silo, ns)
            assert multi_render.get("ServiceAccount", placement.service_account_name, ns) is not None, silo
            for ref in placement.secrets:
                rendered = multi_render.get("Secret", ref.secret, ns) is not None
                # Rendered here, or an existing/expected Secret the NOTES name for this placement.
                assert rendered or f"{{secret: {ref.secret}}}" in multi_render.notes, (silo, ref.secret)
        assert spec.env["AIRFED_STORE_URL"] == multi_values["store"]["url"]
        assert spec.env["AWS_ENDPOINT_URL"] == multi_values["store"]["endpoint"]
        assert f"MLFLOW_TRACKING_URI: {spec.env['MLFLOW_TRACKING_URI']}" in multi_render.notes
        assert {s.name for s in spec.silos} == {s["name"] for s in multi_values["silos"]}


def _chart_secret(values: dict, silo: dict | None) -> tuple[str, str]:
    """(namespace, Secret name) the chart provides for a silo's store key (None: the server's)."""
    if silo is None:
        creds = values["jobNamespace"].get("storeCredentials", {})
        return values["jobNamespace"]["name"], creds.get("existingSecret") or f"{RELEASE}-store"
    creds = silo.get("storeCredentials", {})
    return silo["namespace"], creds.get("existingSecret") or f"{RELEASE}-store-{silo['name']}"


def test_each_store_secret_stays_with_its_own_identity(multi_render, multi_values, default_render):
    """A silo's Secret is rendered only in that silo's namespace (labelled with it), the server's only
    in the job namespace; NOTES point at `airfed policies` and warn where silos share a namespace."""
    by_silo = {s["name"]: s for s in multi_values["silos"]}
    for secret in multi_render.of("Secret"):
        meta = secret["metadata"]
        where = (meta["namespace"], meta["name"])
        if meta["labels"]["app.kubernetes.io/component"] == "silo":
            assert where == _chart_secret(multi_values, by_silo[meta["labels"]["airfed/silo"]])
        elif meta["labels"]["app.kubernetes.io/component"] == "server":
            assert where == _chart_secret(multi_values, None)
    assert "airfed policies SPEC --format minio|aws --out policies/" in multi_render.notes
    assert ("WARNING: silo(s) asia, jp share namespace fl-apac: a pod there can mount any of their Secrets"
            in multi_render.notes)
    assert multi_render.notes.count("WARNING:") == 1 and "WARNING:" not in default_render.notes


def test_each_pod_of_the_example_job_gets_only_its_own_store_secret(multi_values):
    """The CI job's pods as the kubernetes runner renders them: a silo's pods reference exactly the
    Secret the chart made for that silo, the server steps' pods exactly the server's."""
    from airfed.runners.pod_manifests import render_round
    from airfed.spec import parse_spec_text

    ((file, text),) = multi_values["jobs"].items()
    pods = render_round(parse_spec_text(text, file), round_number=1, run_id="manual__helm")
    by_silo = {s["name"]: s for s in multi_values["silos"]}
    assert {p.silo for p in pods} == {None, *by_silo}
    for pod in pods:
        (c,) = [c for c in pod.manifest["spec"]["containers"] if c["name"] == "base"]
        refs = {e["secretRef"]["name"] for e in c.get("envFrom") or []}
        refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env") or [] if "valueFrom" in e}
        namespace, secret = _chart_secret(multi_values, by_silo[pod.silo] if pod.silo else None)
        assert (pod.manifest["metadata"]["namespace"], refs) == (namespace, {secret}), pod.task_id


# -- MLflow -----------------------------------------------------------------------------------------
def _mlflow_container(rendered: Rendered) -> dict:
    (deployment,) = rendered.of("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _arg(container: dict, flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def test_mlflow_server(case):
    name, values, rendered = case
    values = values or {}
    store = {"url": "s3://airfed/fl", "endpoint": "", **values.get("store", {})}
    ns = values.get("jobNamespace", {}).get("name", "airfed")
    (deployment,) = rendered.of("Deployment")
    assert deployment["metadata"]["namespace"] == ns
    pod = deployment["spec"]["template"]["spec"]
    container = _mlflow_container(rendered)
    assert container["image"].startswith("ghcr.io/mlflow/mlflow:v3.")
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    assert _arg(container, "--backend-store-uri") == "$(MLFLOW_BACKEND_STORE_URI)"
    assert _arg(container, "--artifacts-destination") == f"{store['url']}/_mlflow"
    assert _arg(container, "--host") == "0.0.0.0" and _arg(container, "--port") == "5000"
    env = {e["name"]: e for e in container["env"]}
    secret_name = "airfed-mlflow"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": secret_name, "key": "MLFLOW_BACKEND_STORE_URI"}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["optional"] is True
    job_execution = values.get("mlflow", {}).get("jobExecution", False)  # no huey consumers unless asked for
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == str(job_execution).lower()
    if store["endpoint"]:
        assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == store["endpoint"]
    else:
        assert "MLFLOW_S3_ENDPOINT_URL" not in env
    # Rendered Secret only when the backend URI was given in values.
    given = bool(values.get("mlflow", {}).get("backendStoreUri"))
    assert (rendered.get("Secret", secret_name, ns) is not None) == given

    # Hardening: non-root, read-only root filesystem (writable /tmp), no token, probes on /health.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    # The Service matches the pods, and MLflow accepts the Host header clients use (its tracking URI).
    (service,) = rendered.of("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    host = f"{service['metadata']['name']}.{ns}.svc:{service['spec']['ports'][0]['port']}"
    assert f"MLflow tracking server: http://{host}" in rendered.notes
    allowed = _arg(container, "--allowed-hosts").split(",")
    assert f"{service['metadata']['name']}.{ns}.svc:*" in allowed
    assert "*" not in allowed
    for extra in values.get("mlflow", {}).get("allowedHosts", []):
        assert extra in allowed


def test_mlflow_existing_secret_and_disabled(chart):
    rendered = render(chart, {"mlflow": {"existingSecret": "my-mlflow"}})
    env = {e["name"]: e for e in _mlflow_container(rendered)["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "my-mlflow"
    assert rendered.of("Secret") == []
    jobs = render(chart, {"mlflow": {"existingSecret": "my-mlflow", "jobExecution": True}})
    env = {e["name"]: e for e in _mlflow_container(jobs)["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "true"
    off = render(chart, {"mlflow": {"enabled": False}})
    assert off.of("Deployment") == [] and off.of("Service") == []


# -- the official Airflow chart's values -----------------------------------------------------------
def test_airflow_values_wire_image_dags_and_env(default_render):
    values = load_values(AIRFLOW_VALUES)
    dockerfile = (REPO / "images" / "airflow" / "Dockerfile").read_text()
    assert f"FROM apache/airflow:{values['airflowVersion']}-" in dockerfile
    assert values["images"]["airflow"]["repository"] and values["images"]["airflow"]["tag"]
    assert values["defaultAirflowRepository"] == values["images"]["airflow"]["repository"]
    assert values["executor"] in {"KubernetesExecutor", "CeleryExecutor"}

    cm_name = default_render.of("ConfigMap")[0]["metadata"]["name"]
    for component in ("scheduler", "dagProcessor", "workers", "apiServer"):
        volumes = {v["name"]: v for v in values[component]["extraVolumes"]}
        mounts = {m["name"]: m for m in values[component]["extraVolumeMounts"]}
        (name,) = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == cm_name]
        assert mounts[name]["mountPath"] == "/opt/airflow/dags", component
    assert not values["dags"]["gitSync"]["enabled"] and not values["dags"]["persistence"]["enabled"]

    env = {e["name"]: e["value"] for e in values["env"]}
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert env["AIRFED_STORE_URL"] == chart_defaults["store"]["url"]
    assert f"MLflow tracking server: {env['MLFLOW_TRACKING_URI']}" in default_render.notes
    assert json.loads(env["AIRFLOW_CONN_KUBERNETES_DEFAULT"])["extra"]["in_cluster"] is True
    # The RBAC subject the chart binds by default is the worker of a release named "airflow".
    assert default_render.of("RoleBinding")[0]["subjects"][0]["name"] == "airflow-worker"
