"""The regional tier on the Airflow side: the spec's errors (file:line), the round's DAG with its
regional steps, each step's store, and residency on ``airfed render``'s pods: global pods carry no
region's store credentials, a region's silo and regional pods only their own region's."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from helpers import REPO

from fl_tasks.contract import REGIONAL_ROUND_STEPS, ROUND_STEPS
from fl_tasks.regions import (
    REGION_ENV_PREFIX,
    REGION_STORE_URL_ENV,
    STORE_URL_ENV,
    region_store_environ,
    step_stores,
)

BASE = textwrap.dedent("""\
    job: regional
    client_app: examples.digits.client_app:app
    model: {init: examples.digits.model:initial_state}
    """)


def load(tmp_path, text: str):
    from airfed.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(BASE + textwrap.dedent(text))
    return load_spec(path)


def problems(tmp_path, text: str) -> list[str]:
    from airfed.spec import SpecError

    with pytest.raises(SpecError) as err:
        load(tmp_path, text)
    return [str(p) for p in err.value.problems]


@pytest.mark.parametrize("text,expected", [
    ("""\
     regions: [{name: eu}]
     silos:
       - {name: a, region: eu, data: x}
       - {name: b, data: x}
     """, "spec.yaml:7: silos[1].region: silo 'b' needs a region (one of eu)"),
    ("""\
     regions: [{name: eu}]
     silos:
       - {name: a, region: mars, data: x}
     """, "spec.yaml:6: silos[0].region: unknown region 'mars'; expected one of eu"),
    ("""\
     silos:
       - {name: a, region: eu, data: x}
     """, "spec.yaml:5: silos[0].region: the job defines no 'regions'"),
    ("""\
     strategy: {name: FedMedian}
     regions: [{name: eu}]
     silos: [{name: a, region: eu, data: x}]
     """, "across_regions.rule: FedMedian does not compose across regions exactly"),
    ("""\
     regions: [{name: eu}]
     across_regions: {rule: FedMedian}
     silos: [{name: a, region: eu, data: x}]
     """, "spec.yaml:5: across_regions.rule: FedAvg combines regional partials exactly"),
    ("""\
     regions: [{name: eu}, {name: us}]
     across_regions: {min_regions: 3}
     silos: [{name: a, region: eu, data: x}, {name: b, region: us, data: x}]
     """, "spec.yaml:5: across_regions.min_regions: larger than the number of regions (2)"),
    ("""\
     regions:
       - {name: eu, quorum: {min_silos: 2}}
     silos: [{name: a, region: eu, data: x}]
     """, "spec.yaml:5: regions[0].quorum.min_silos: larger than the region's 1 silo(s)"),
    ("""\
     regions: [{name: eu}, {name: us}]
     silos: [{name: a, region: eu, data: x}]
     """, "spec.yaml:4: regions[1].name: region 'us' has no silos"),
    ("""\
     strategy: {name: Bulyan}
     across_regions: {rule: FedMedian}
     regions: [{name: eu}, {name: us}]
     silos: [{name: a, region: eu, data: x}, {name: b, region: eu, data: x}, {name: c, region: us, data: x},
             {name: d, region: us, data: x}, {name: e, region: us, data: x}]
     """, "regions[0].name: Bulyan runs per region: strategy.params.num_malicious_nodes=0: Bulyan needs at least"),
    ("""\
     placement: {secrets: [{secret: eu-store}]}
     regions:
       - {name: eu, store: "s3://eu/fl", store_secrets: [{secret: eu-store}]}
     silos: [{name: a, region: eu, data: x}]
     """, "spec.yaml:4: placement.secrets[0].secret: Secret 'eu-store' is region 'eu''s store credential"),
    ("""\
     regions:
       - {name: eu, store: "s3://eu/fl", store_secrets: [{secret: eu-store}]}
       - {name: us, store: "s3://us/fl"}
     silos:
       - {name: a, region: eu, data: x}
       - {name: b, region: us, data: x, placement: {secrets: [{secret: eu-store}]}}
     """, "silos[1].placement.secrets[0].secret: Secret 'eu-store' is region 'eu''s store credential; silo 'b'"),
    ("""\
     regions: [{name: eu, store: "ftp://x"}]
     silos: [{name: a, region: eu, data: x}]
     """, "spec.yaml:4: regions[0].store: 'ftp://x' is not a store URL"),
])
def test_undefined_or_inconsistent_regions_are_refused_with_file_line_field(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


def test_flat_job_is_unchanged_by_the_regional_fields():
    """A flat job: today's step order, no store env added, the spec hash as before regions existed."""
    from airfed.dag.builder import build_dag, round_steps
    from airfed.spec import load_spec

    spec = load_spec(REPO / "dags" / "digits.yaml")
    assert round_steps(spec) == ROUND_STEPS
    dag = build_dag(spec, REPO / "dags" / "digits.yaml")
    assert [t.task_id for t in dag.tasks] == [*ROUND_STEPS, "model_event", "next_round"]
    assert "region" not in spec.canonical_json()
    assert all(step_stores(spec, "train", silo=s.name).region_store is None for s in spec.silos)


def test_regional_dag_maps_the_tier_over_regions_and_points_each_step_at_its_store(airfed_home):
    from airfed.dag.builder import TEMPLATED_REFS, build_dag
    from airfed.dag.step_calls import round_calls
    from airfed.spec import load_spec

    path = REPO / "dags" / "digits_regions.yaml"
    spec = load_spec(path)
    dag = build_dag(spec, path)
    assert [t.task_id for t in dag.tasks] == [*REGIONAL_ROUND_STEPS, "model_event", "next_round"]
    for before, after in zip(REGIONAL_ROUND_STEPS, REGIONAL_ROUND_STEPS[1:], strict=False):
        assert dag.get_task(after).upstream_task_ids == {before}
    # a region that is down stops neither the other regions' silos nor the global tier
    all_done = {"train", "validate", "aggregate_region", "aggregate", "evaluate", "collect_region", "register"}
    assert {t.task_id for t in dag.tasks if t.trigger_rule == "all_done"} == all_done

    calls = round_calls(spec, TEMPLATED_REFS)
    regions = {r.name: f"file://{airfed_home}/regions/{r.name}" for r in spec.regions}
    for step in ("train", "validate", "evaluate"):
        for call in calls[step]:
            home = next(s.region for s in spec.silos if s.name == call.silo)
            assert call.env[STORE_URL_ENV] == regions[home] and REGION_STORE_URL_ENV not in call.env
    for step in ("distribute_region", "aggregate_region", "publish_region", "collect_region"):
        assert [c.region for c in calls[step]] == ["us", "eu", "asia"]
        for call in calls[step]:
            assert call.env[REGION_STORE_URL_ENV] == regions[call.region] and STORE_URL_ENV not in call.env
            assert call.argv[-2:] == ["--region", call.region]
    for step in ("distribute", "aggregate", "register"):
        assert STORE_URL_ENV not in calls[step].env and REGION_STORE_URL_ENV not in calls[step].env


def test_step_stores_answers_which_store_each_step_uses(tmp_path):
    """The one answer the DAG builder and least-privilege policies take: a region without its own
    store keeps its objects in the job's store."""
    spec = load(tmp_path, """\
        regions: [{name: eu, store: "s3://fl-eu/airfed"}, {name: us}]
        silos: [{name: a, region: eu, data: x}, {name: b, region: us, data: x}]
        """)
    table = {
        ("train", "a", None): ("s3://fl-eu/airfed", False),
        ("evaluate", "a", None): ("s3://fl-eu/airfed", False),
        ("train", "b", None): (None, True),
        ("aggregate_region", None, "eu"): ("s3://fl-eu/airfed", True),
        ("distribute_region", None, "us"): (None, True),
        ("aggregate", None, None): (None, True),
    }
    for (step, silo, region), (url, job) in table.items():
        stores = step_stores(spec, step, silo=silo, region=region)
        assert (stores.region_store, stores.job_store) == (url, job), (step, silo, region)
    with pytest.raises(ValueError, match="per region"):
        step_stores(spec, "aggregate_region")


REGIONAL_K8S = """\
    runner: kubernetes
    image: airfed/fl-task:test
    env: {AIRFED_STORE_URL: "s3://fl-global/airfed"}
    placement: {namespace: fl-global, secrets: [{secret: global-store}]}
    regions:
      - name: eu
        store: s3://fl-eu/airfed
        store_secrets: [{secret: eu-store}]
        placement: {kubernetes_conn_id: k8s_eu, namespace: fl-eu, secrets: [{secret: eu-partials-writer}]}
      - name: us
        store: s3://fl-us/airfed
        store_secrets: [{secret: us-store, key: AWS_SECRET_ACCESS_KEY}]
        placement: {kubernetes_conn_id: k8s_us, namespace: fl-us}
    silos:
      - {name: charite, region: eu, data: /data/c, placement: {namespace: fl-eu}}
      - {name: aphp, region: eu, data: /data/a, placement: {namespace: fl-eu}}
      - {name: mayo, region: us, data: /data/m, placement: {namespace: fl-us, secrets: [{secret: mayo-gpu}]}}
    """


def secret_names(manifest: dict) -> set[str]:
    """Every Secret a rendered pod references (env valueFrom and envFrom), across its containers."""
    names = set()
    for c in manifest["spec"]["containers"]:
        for env in c.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in c.get("envFrom") or []:
            if source.get("secretRef"):
                names.add(source["secretRef"]["name"])
    return names


def test_rendered_pods_keep_each_region_store_credentials_in_that_region(tmp_path, airfed_home):
    import kubernetes_validate
    from airfed.runners.pod_manifests import render_round, to_yaml
    from kubernetes_specs import K8S_VERSION

    spec = load(tmp_path, REGIONAL_K8S)
    pods = render_round(spec, round_number=1, run_id="manual__2025-01-01T00:00:00+00:00")
    text = to_yaml(pods)  # what `airfed render` prints
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == len(pods) == 3 + 4 * 2 + 3 * 3  # global steps, regional tier, silo steps
    regional = {"eu": {"eu-store"}, "us": {"us-store"}}
    all_regional = set().union(*regional.values())
    silo_region = {s.name: s.region for s in spec.silos}
    for pod, doc in zip(pods, docs, strict=True):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        secrets = secret_names(doc)
        env = {e["name"]: e.get("value") for e in doc["spec"]["containers"][0].get("env") or []}
        if pod.silo is None and pod.region is None:  # the global tier
            assert not secrets & all_regional, (pod.task_id, secrets)
            assert env[STORE_URL_ENV] == "s3://fl-global/airfed"
            continue
        home = pod.region or silo_region[pod.silo]
        assert secrets & all_regional == regional[home], (pod.task_id, pod.silo, pod.region, secrets)
        assert doc["metadata"]["namespace"] == f"fl-{home}"
        container = doc["spec"]["containers"][0]
        prefixes = {source["secretRef"]["name"]: source.get("prefix") for source in container.get("envFrom") or []}
        key_refs = {e["valueFrom"]["secretKeyRef"]["name"]: e["name"] for e in container.get("env") or []
                    if "valueFrom" in e}
        if pod.region:  # the regional aggregator: both stores, its region's by URL
            assert env[REGION_STORE_URL_ENV] == f"s3://fl-{home}/airfed"
            assert doc["metadata"]["labels"]["airfed/region"] == home
            # the region store's key under AIRFED_REGION_, its own key to the job's store as plain AWS_*
            if home == "eu":
                assert prefixes == {"eu-partials-writer": None, "eu-store": REGION_ENV_PREFIX}, prefixes
            else:
                assert key_refs == {"us-store": f"{REGION_ENV_PREFIX}AWS_SECRET_ACCESS_KEY"}, key_refs
        else:  # a silo step sees only its region's store, its key as plain AWS_*
            assert env[STORE_URL_ENV] == f"s3://fl-{home}/airfed" and REGION_STORE_URL_ENV not in env
            assert all(prefix is None for prefix in prefixes.values()), prefixes
            assert all(not name.startswith(REGION_ENV_PREFIX) for name in key_refs.values()), key_refs
    assert "# aggregate_region[eu] | Airflow connection: k8s_eu" in text


def test_a_regions_store_settings_come_from_its_own_names_first_and_never_borrow_the_job_key():
    job = {"AWS_ENDPOINT_URL": "http://job:9000", "AWS_ACCESS_KEY_ID": "JOB", "AWS_SECRET_ACCESS_KEY": "job-secret",
           "AWS_SESSION_TOKEN": "job-token", "OTHER": "kept"}
    assert region_store_environ(job, "eu") == job  # a region beside the job's store: the job's settings
    generic = {"AIRFED_REGION_AWS_ENDPOINT_URL": "http://region:9000", "AIRFED_REGION_AWS_ACCESS_KEY_ID": "REGION",
               "AIRFED_REGION_AWS_SECRET_ACCESS_KEY": "region-secret"}
    named = {"AIRFED_REGION_EU_WEST_AWS_ENDPOINT_URL": "http://eu:9000",
             "AIRFED_REGION_EU_WEST_AWS_ACCESS_KEY_ID": "EU",
             "AIRFED_REGION_EU_WEST_AWS_SECRET_ACCESS_KEY": "eu-secret"}
    got = region_store_environ({**job, **generic, **named}, "eu-west")
    assert (got["AWS_ENDPOINT_URL"], got["AWS_ACCESS_KEY_ID"], got["AWS_SECRET_ACCESS_KEY"]) == (
        "http://eu:9000", "EU", "eu-secret")
    assert "AWS_SESSION_TOKEN" not in got and got["OTHER"] == "kept"  # the job's token does not come along
    got = region_store_environ({**job, **generic, **named}, "us")  # not eu-west: the generic names
    assert (got["AWS_ENDPOINT_URL"], got["AWS_ACCESS_KEY_ID"]) == ("http://region:9000", "REGION")
    keys_only = region_store_environ({**job, "AIRFED_REGION_AWS_ACCESS_KEY_ID": "R",
                                      "AIRFED_REGION_AWS_SECRET_ACCESS_KEY": "r"}, "us")
    assert (keys_only["AWS_ENDPOINT_URL"], keys_only["AWS_ACCESS_KEY_ID"]) == ("http://job:9000", "R")
    with pytest.raises(ValueError, match="AIRFED_REGION_EU_WEST_AWS_ENDPOINT_URL set but no "
                                         "AIRFED_REGION_EU_WEST_AWS_ACCESS_KEY_ID"):
        region_store_environ({**job, "AIRFED_REGION_EU_WEST_AWS_ENDPOINT_URL": "http://eu:9000"}, "eu-west")
