"""``airfed policies``: what each generated policy allows, read with the S3 wildcard rule.

The policies are evaluated here with :func:`fl_tasks.policies.allows` (``*`` matches across ``/``,
as in S3) on the keys the steps really use (:class:`fl_tasks.store.JobKeys`); the same policies
are enforced by a real S3 server in tests/fl_tasks/store/test_policy_enforcement.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from airfed.cli import main as airfed
from airfed.spec import load_spec
from helpers import EXAMPLE_SPEC

from fl_tasks.policies import (
    JobPolicies,
    JobStores,
    PolicyError,
    StoreLocation,
    allows,
    check_isolation,
    generate,
    locate,
)
from fl_tasks.spec import JobSpec
from fl_tasks.store import JobKeys

WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")


@pytest.fixture(scope="module")
def digits() -> JobSpec:
    return load_spec(EXAMPLE_SPEC)


def with_silos(spec: JobSpec, names: list[str], **silo_env: dict[str, str]) -> JobSpec:
    template = spec.silos[0]
    silos = [template.model_copy(update={"name": n, "env": silo_env.get(n.replace("-", "_"), {})}) for n in names]
    return spec.model_copy(update={"silos": silos})


def own_and_others(keys: JobKeys, silo: str, r: int) -> list[str]:
    return [keys.update(r, silo), keys.manifest(r, silo), keys.status(r, silo), keys.verdict(r, silo),
            keys.evaluation(r, silo)]


def test_digits_has_one_policy_per_silo_plus_server_and_ui(digits):
    result = generate(digits)
    assert list(result.policies) == ["digits-silo-us", "digits-silo-eu", "digits-silo-asia", "digits-server",
                                     "digits-ui"]
    for silo, name in result.silo_names.items():
        written = [r for st in result.policies[name]["Statement"] if set(WRITES) & set(st["Action"])
                   for r in st["Resource"]]
        assert written, name
        for resource in written:
            assert resource.startswith("arn:aws:s3:::airfed/fl/digits/rounds/*/"), resource
            assert resource.rsplit("/", 1)[1].split(".")[0] == silo, resource
            assert resource.rsplit("/", 2)[1] in ("updates", "validation", "evaluation"), resource


@pytest.mark.parametrize("fmt", ["aws", "minio"])
def test_a_silo_writes_its_own_keys_and_nothing_else(digits, fmt):
    """Silo ``a`` against silo ``ab`` and ``x-a`` (names that share a prefix or suffix) and another
    job whose name extends this one's: ``*`` crosses ``/`` but the pinned parts around it do not."""
    spec = with_silos(digits, ["a", "ab", "x-a"])
    result = generate(spec, fmt)
    store = StoreLocation("airfed", "fl")
    keys, other_job = JobKeys("digits"), JobKeys("digits-x")
    policy = result.policies["digits-silo-a"]
    for r in (1, 7, 123):
        for key in own_and_others(keys, "a", r):
            for action in ("s3:GetObject", *WRITES):
                assert allows(policy, action, store.arn(key)), (action, key)
        for key in own_and_others(keys, "ab", r) + own_and_others(keys, "x-a", r) + own_and_others(other_job, "a", r):
            for action in ("s3:GetObject", *WRITES):
                assert not allows(policy, action, store.arn(key)), (action, key)
        for key in (keys.plan(r), keys.global_model(r), keys.result(r), keys.head):
            assert allows(policy, "s3:GetObject", store.arn(key))
            assert not any(allows(policy, a, store.arn(key)) for a in WRITES), key
        for key in (keys.registry(r), keys.server_state(r), keys.lost("run"), keys.convergence_plot):
            assert not any(allows(policy, a, store.arn(key)) for a in ("s3:GetObject", *WRITES)), key
        assert not allows(policy, "s3:GetObject", StoreLocation("other-bucket", "fl").arn(keys.plan(r)))


def test_server_writes_the_whole_job_and_the_ui_reads_it(digits):
    result = generate(digits)
    store, keys = StoreLocation("airfed", "fl"), JobKeys("digits")
    server, ui = result.policies["digits-server"], result.policies["digits-ui"]
    for key in (keys.head, keys.plan(3), keys.global_model(4), keys.result(3), keys.update(3, "eu"),
                keys.verdict(3, "us"), keys.lost("manual__1"), keys.convergence_plot):
        assert allows(server, "s3:PutObject", store.arn(key)) and allows(server, "s3:GetObject", store.arn(key))
        assert allows(ui, "s3:GetObject", store.arn(key))
        assert not any(allows(ui, a, store.arn(key)) for a in WRITES), key
    assert allows(server, "s3:ListBucket", store.bucket_arn)
    assert not allows(server, "s3:PutObject", store.arn("digits2/HEAD.json"))
    assert not allows(server, "s3:CreateBucket", store.bucket_arn)
    assert not allows(server, "s3:DeleteBucket", store.bucket_arn)


def test_listing_is_aws_only_and_limited_to_the_job_for_silos_and_ui(digits):
    def listing(result: JobPolicies, name: str) -> list[dict]:
        return [st for st in result.policies[name]["Statement"] if "s3:ListBucket" in st["Action"]]

    aws, minio = generate(digits, "aws"), generate(digits, "minio")
    for name in ("digits-silo-us", "digits-ui"):
        assert listing(minio, name) == []
        (statement,) = listing(aws, name)
        assert statement["Condition"] == {"StringLike": {"s3:prefix": ["fl/digits/*"]}}
    for result in (aws, minio):  # the server finds the bucket (HeadBucket is authorised as ListBucket)
        (statement,) = listing(result, "digits-server")
        assert "Condition" not in statement and statement["Resource"] == ["arn:aws:s3:::airfed"]


def test_each_silo_is_bound_to_its_own_store_and_the_server_covers_all(digits):
    spec = digits.model_copy(update={"env": {"AIRFED_STORE_URL": "s3://central/fed/"}})
    spec = with_silos(spec, ["us", "eu"], eu={"AIRFED_STORE_URL": "s3://eu-bucket"})
    result = generate(spec)
    keys = JobKeys("digits")
    central, eu = StoreLocation("central", "fed"), StoreLocation("eu-bucket", "")
    assert allows(result.policies["digits-silo-eu"], "s3:PutObject", eu.arn(keys.update(2, "eu")))
    assert not allows(result.policies["digits-silo-eu"], "s3:PutObject", central.arn(keys.update(2, "eu")))
    assert allows(result.policies["digits-silo-us"], "s3:PutObject", central.arn(keys.update(2, "us")))
    assert not allows(result.policies["digits-silo-us"], "s3:GetObject", eu.arn(keys.plan(2)))
    for store in (central, eu):
        assert allows(result.policies["digits-server"], "s3:PutObject", store.arn(keys.head))
        assert allows(result.policies["digits-ui"], "s3:GetObject", store.arn(keys.head))
    assert result.stores["digits-silo-eu"] == "s3://eu-bucket"
    assert result.stores["digits-server"] == "s3://central/fed, s3://eu-bucket"


def test_the_isolation_check_catches_a_policy_too_wide(digits):
    """The check is what stands between a generator bug and a deployed policy: widen one pattern."""
    result = generate(with_silos(digits, ["a", "ab"]))
    policy = result.policies["digits-silo-a"]
    policy["Statement"][1]["Resource"][0] = policy["Statement"][1]["Resource"][0].replace("/a.safetensors", "/a*")
    with pytest.raises(PolicyError, match=r"digits-silo-a: s3:PutObject on .*updates/ab\.safetensors would be allowed"):
        store = StoreLocation("airfed", "fl")
        check_isolation(result, JobStores(job=store, silos={"a": store, "ab": store}))


@pytest.mark.parametrize("url, message", [
    ("file:///var/airfed/store", "is not an s3://bucket/prefix store"),
    ("s3://bucket/pre*fix", "wildcards"),
])
def test_a_store_url_a_policy_cannot_name_is_an_error_naming_it(digits, url, message):
    spec = with_silos(digits, ["us", "eu"], eu={"AIRFED_STORE_URL": url})
    with pytest.raises(PolicyError, match=rf"silo eu: .*{message}"):
        generate(spec)


def test_cli_prints_every_policy_and_writes_files(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("AIRFED_STORE_URL", raising=False)
    assert airfed(["policies", str(EXAMPLE_SPEC), "--format", "minio", "--store-url", "s3://weights/team",
                   "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert sorted(printed) == ["digits-server", "digits-silo-asia", "digits-silo-eu", "digits-silo-us", "digits-ui"]
    for name, document in printed.items():
        assert json.loads((tmp_path / f"{name}.json").read_text()) == document
    assert "arn:aws:s3:::weights/team/digits/rounds/*/updates/us.safetensors" in json.dumps(printed["digits-silo-us"])
    assert f"{tmp_path / 'digits-silo-us.json'}: s3://weights/team" in out.err


def test_cli_without_a_store_says_which_it_assumed(capsys, monkeypatch):
    monkeypatch.delenv("AIRFED_STORE_URL", raising=False)
    assert airfed(["policies", str(EXAMPLE_SPEC)]) == 0
    out = capsys.readouterr()
    assert "names no s3:// store" in out.err and "s3://airfed/fl" in out.err
    printed = json.loads(out.out)
    assert printed["digits-server"]["Statement"][0]["Resource"] == ["arn:aws:s3:::airfed/fl/digits/*"]
    assert "arn:aws:s3:::airfed/fl/digits/HEAD.json" in printed["digits-silo-us"]["Statement"][0]["Resource"]


def test_cli_reports_a_bad_store_url_and_exits_1(tmp_path: Path, capsys):
    text = EXAMPLE_SPEC.read_text().replace("silos:\n", "env:\n  AIRFED_STORE_URL: /srv/store\nsilos:\n", 1)
    spec = tmp_path / "digits.yaml"
    spec.write_text(text)
    assert airfed(["policies", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"{spec}: silo us: AIRFED_STORE_URL='/srv/store' is not an s3://bucket/prefix store" in err


def test_placements_that_would_share_a_key_are_named(tmp_path: Path, capsys):
    """The chart's CI job: asia and jp share a namespace. Then a silo given the server's Secret."""
    from helpers import REPO

    from fl_tasks.policies import credential_sharing

    values = yaml.safe_load((REPO / "helm/airfed/ci/multi-silo-values.yaml").read_text())
    (text,) = values["jobs"].values()
    spec = tmp_path / "federated-digits.yaml"
    spec.write_text(text)
    assert airfed(["policies", str(spec)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"airfed policies: warning: {spec}: silo asia and silo jp run in one namespace (fl-apac): their pods "
        "could mount each other's Secrets; give each silo a namespace of its own"]

    loaded = load_spec(spec)
    us = loaded.silos[0]
    server_ns = us.placement.model_copy(update={"namespace": "fl-server", "secrets": loaded.placement.secrets})
    shared = loaded.model_copy(update={"silos": [us.model_copy(update={"placement": server_ns})]})
    assert credential_sharing(shared) == [
        "Secret 'fl-server-store' (namespace fl-server) is given to the server steps and silo us: if it holds "
        "store credentials, each needs a key (and Secret) of its own",
        "the server steps and silo us run in one namespace (fl-server): their pods could mount each other's "
        "Secrets; give each silo a namespace of its own"]
    assert credential_sharing(load_spec(EXAMPLE_SPEC)) == []  # the local runner: nothing to keep apart


# -- a job with regions (dags/digits_regions.yaml): each region's store is its own ----------------------
JOB_STORE = "s3://central/fl"
REGION_STORES = {"us": "s3://fl-us/store", "eu": "s3://fl-eu", "asia": "s3://central/asia"}


@pytest.fixture(scope="module")
def digits_regions() -> JobSpec:
    from helpers import REPO

    return load_spec(REPO / "dags/digits_regions.yaml")


def resources(policy: dict, actions: tuple[str, ...] = ("s3:GetObject", *WRITES, "s3:ListBucket")) -> list[str]:
    return [r for st in policy["Statement"] if set(actions) & set(st["Action"]) for r in st["Resource"]]


def arn_prefix(url: str) -> str:
    """What every ARN of a store begins with: its bucket and prefix (the bucket alone for listing)."""
    return StoreLocation.parse(url, "test").arn("")


def test_digits_regions_every_identity_names_only_its_own_stores(digits_regions):
    result = generate(digits_regions, "aws", JOB_STORE, REGION_STORES)
    job = "digits_regions"
    assert list(result.region_names.values()) == [f"{job}-region-{r}" for r in ("us", "eu", "asia")]
    region_of = {s.name: s.region for s in digits_regions.silos}
    for silo, name in result.silo_names.items():
        store = REGION_STORES[region_of[silo]]
        bucket = StoreLocation.parse(store, "test").bucket_arn
        for resource in resources(result.policies[name]):
            assert resource == bucket or resource.startswith(arn_prefix(store) + job + "/"), (name, resource)
        assert result.stores[name] == store
    for name in (result.server, result.ui):
        for resource in resources(result.policies[name]):
            assert resource == "arn:aws:s3:::central" or resource.startswith("arn:aws:s3:::central/fl/"), resource
        assert result.stores[name] == JOB_STORE
    for region, name in result.region_names.items():
        own, policy = REGION_STORES[region], result.policies[name]
        silos = [s for s, r in region_of.items() if r == region]
        for resource in resources(policy):
            assert resource.split("/")[0] in (StoreLocation.parse(own, "t").bucket_arn, "arn:aws:s3:::central")
            assert not resource.startswith(arn_prefix(JOB_STORE) + f"{job}/rounds/*/updates/") or \
                any(resource.endswith(f"/updates/{s}.json") or resource.endswith(f"/updates/{s}.status.json")
                    for s in silos), resource
        job_writes = [r for r in resources(policy, WRITES) if r.startswith(arn_prefix(JOB_STORE))]
        assert sorted(job_writes) == sorted(
            [arn_prefix(JOB_STORE) + f"{job}/rounds/*/regions/{region}.{ext}" for ext in ("safetensors", "json")]
            + [arn_prefix(JOB_STORE) + f"{job}/rounds/*/{kind}/{s}.{ext}" for s in silos
               for kind, ext in (("updates", "json"), ("updates", "status.json"), ("validation", "json"),
                                 ("evaluation", "json"))])
        assert result.stores[name] == f"{JOB_STORE}, {own}"


def test_a_region_s_silo_and_aggregator_cannot_reach_another_region(digits_regions):
    """Read with the S3 wildcard rule on the keys the regional steps use, in every store of the job."""
    result = generate(digits_regions, "minio", JOB_STORE, REGION_STORES)
    keys = JobKeys("digits_regions")
    central, us, eu = (StoreLocation.parse(u, "t") for u in (JOB_STORE, REGION_STORES["us"], REGION_STORES["eu"]))
    berlin, region_eu = result.policies[result.silo_names["eu-berlin"]], result.policies[result.region_names["eu"]]
    for r in (1, 9):
        assert allows(berlin, "s3:PutObject", eu.arn(keys.update(r, "eu-berlin")))
        assert allows(berlin, "s3:GetObject", eu.arn(keys.plan(r)))
        for store in (central, us, eu):  # never another silo's objects, in any store
            for key in own_and_others(keys, "eu-paris", r) + own_and_others(keys, "us-east", r):
                assert not any(allows(berlin, a, store.arn(key)) for a in ("s3:GetObject", *WRITES)), key
        for store in (central, us):  # nothing at all outside its region's store
            for key in own_and_others(keys, "eu-berlin", r) + [keys.plan(r), keys.global_model(r), keys.head]:
                assert not any(allows(berlin, a, store.arn(key)) for a in ("s3:GetObject", *WRITES)), key
        for region in ("us", "eu"):
            for partial in (keys.partial(r, region), keys.partial_record(r, region)):  # the steps' own keys
                assert not allows(berlin, "s3:PutObject", central.arn(partial))
                assert allows(region_eu, "s3:PutObject", central.arn(partial)) == (region == "eu")
        # the eu aggregator: its silos' updates in its own store, read only; never an update in the job store
        assert allows(region_eu, "s3:GetObject", eu.arn(keys.update(r, "eu-paris")))
        assert not allows(region_eu, "s3:PutObject", eu.arn(keys.update(r, "eu-paris")))
        assert not allows(region_eu, "s3:GetObject", us.arn(keys.update(r, "us-east")))
        assert not allows(region_eu, "s3:PutObject", central.arn(keys.update(r, "eu-paris")))
        assert allows(region_eu, "s3:PutObject", central.arn(keys.verdict(r, "eu-paris")))
        assert not allows(region_eu, "s3:PutObject", central.arn(keys.verdict(r, "us-east")))
        for key in (keys.plan(r), keys.global_model(r + 1), keys.result(r)):  # down: read there, write here
            assert allows(region_eu, "s3:GetObject", central.arn(key))
            assert not allows(region_eu, "s3:PutObject", central.arn(key))
            assert allows(region_eu, "s3:PutObject", eu.arn(key))
            assert not allows(region_eu, "s3:PutObject", us.arn(key))
        assert not allows(region_eu, "s3:PutObject", central.arn(keys.head))
        # residency: the global tier never reaches a region's store
        for name in (result.server, result.ui):
            for key in (keys.update(r, "eu-berlin"), keys.manifest(r, "eu-berlin"), keys.plan(r)):
                assert not any(allows(result.policies[name], a, eu.arn(key)) for a in ("s3:GetObject", *WRITES))
        server = result.policies[result.server]
        assert allows(server, "s3:PutObject", central.arn(keys.partial_record(r, "eu")))


def test_a_region_without_a_store_of_its_own_keeps_its_silos_on_the_job_store(digits_regions):
    spec = digits_regions.model_copy(update={"regions": [
        r.model_copy(update={"store": None}) if r.name == "asia" else r for r in digits_regions.regions]})
    result = generate(spec, "aws", JOB_STORE, {"us": REGION_STORES["us"], "eu": REGION_STORES["eu"]})
    central, keys = StoreLocation.parse(JOB_STORE, "t"), JobKeys("digits_regions")
    tokyo, asia = result.policies[result.silo_names["asia-tokyo"]], result.policies[result.region_names["asia"]]
    assert allows(tokyo, "s3:PutObject", central.arn(keys.update(3, "asia-tokyo")))
    assert allows(asia, "s3:GetObject", central.arn(keys.update(3, "asia-tokyo")))
    assert not allows(asia, "s3:PutObject", central.arn(keys.manifest(3, "asia-tokyo")))  # nothing to copy
    assert not allows(asia, "s3:GetObject", central.arn(keys.update(3, "eu-berlin")))
    assert result.stores[result.region_names["asia"]] == JOB_STORE


def test_the_isolation_check_catches_a_regional_policy_too_wide(digits_regions):
    result = generate(digits_regions, "aws", JOB_STORE, REGION_STORES)
    statement = result.policies[result.region_names["eu"]]["Statement"][1]
    assert statement["Sid"] == "WriteOwnPartial"
    statement["Resource"] = [r.replace("/regions/eu.json", "/regions/*") for r in statement["Resource"]]
    with pytest.raises(PolicyError, match=r"region-eu: s3:PutObject on .*regions/us\..* would be allowed"):
        check_isolation(result, locate(digits_regions, JOB_STORE, REGION_STORES))


@pytest.mark.parametrize("stores, asia_has_a_store, message", [
    ({}, True, r"region us: store 'file://\$\{AIRFED_HOME\}/regions/us' is not an s3://bucket/prefix store.*"
               r"--region-store us=s3://"),
    ({**REGION_STORES, "eu": JOB_STORE + "/"}, True, "region eu: its store s3://central/fl is the job's store"),
    ({**REGION_STORES, "mars": "s3://m"}, True, "job digits_regions has no region 'mars'"),
    ({**REGION_STORES, "asia": "s3://a"}, False, "region asia has no `store` of its own"),
])
def test_a_region_store_a_policy_cannot_name_is_an_error_naming_it(digits_regions, stores, asia_has_a_store, message):
    spec = digits_regions
    if not asia_has_a_store:
        spec = spec.model_copy(update={"regions": [
            r.model_copy(update={"store": None}) if r.name == "asia" else r for r in spec.regions]})
    with pytest.raises(PolicyError, match=message):
        generate(spec, "aws", JOB_STORE, stores)


def test_cli_takes_each_region_s_store(tmp_path: Path, capsys, monkeypatch):
    from helpers import REPO

    monkeypatch.delenv("AIRFED_STORE_URL", raising=False)
    spec = REPO / "dags/digits_regions.yaml"
    assert airfed(["policies", str(spec), "--store-url", JOB_STORE]) == 1
    assert "region us: store 'file://${AIRFED_HOME}/regions/us' is not" in capsys.readouterr().err
    assert airfed(["policies", str(spec), "--store-url", JOB_STORE, "--out", str(tmp_path),
                   *(f"--region-store={r}={u}" for r, u in REGION_STORES.items())]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert "digits_regions-region-eu" in printed and len(printed) == 6 + 3 + 2
    assert f"{tmp_path / 'digits_regions-region-eu.json'}: s3://central/fl, s3://fl-eu" in out.err
    assert airfed(["policies", str(spec), "--region-store", "us"]) == 1
    assert "--region-store 'us': expected NAME=s3://bucket/prefix" in capsys.readouterr().err


def test_a_region_s_store_secret_shared_with_its_aggregator_is_named(digits_regions):
    """A region's ``store_secrets`` reach its silos' pods and its aggregator's: in one namespace, one key."""
    from fl_tasks.policies import credential_sharing
    from fl_tasks.spec import SecretRef

    def placed(thing, namespace):
        return thing.model_copy(update={"placement": thing.placement.model_copy(update={"namespace": namespace})})

    silos = [placed(s, "fl-eu" if s.name == "eu-berlin" else f"fl-{s.name}") for s in digits_regions.silos]
    regions = [placed(r, f"fl-{r.name}").model_copy(update={"store_secrets": [SecretRef(secret=f"{r.name}-store")]})
               for r in digits_regions.regions]
    spec = digits_regions.model_copy(update={"runner": "kubernetes", "silos": silos, "regions": regions})
    assert credential_sharing(spec) == [
        "Secret 'eu-store' (namespace fl-eu) is given to silo eu-berlin and region eu's aggregator: if it holds "
        "store credentials, each needs a key (and Secret) of its own",
        "silo eu-berlin and region eu's aggregator run in one namespace (fl-eu): their pods could mount each "
        "other's Secrets; give each silo a namespace of its own"]
