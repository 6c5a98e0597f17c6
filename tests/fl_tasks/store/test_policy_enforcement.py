"""The generated policies (``airfed policies``) on an S3 server that enforces them.

moto's server checks every S3 request against the IAM policies of the requesting key
(:class:`s3_server.EnforcingS3`): each silo, the server and the UI get an IAM user of their own
with the policy ``fl_tasks.policies`` generates for it (AWS format). Then:

- a silo's key writes its own objects and gets 403 AccessDenied for another silo's update and
  manifest (names sharing a prefix or suffix included), another job's keys, the global, the plan
  and HEAD;
- a whole round (distribute, train, validate, aggregate, evaluate, register) commits with every
  step holding only its own identity's key, while a silo's attempt to overwrite another silo's
  update is refused and leaves no trace in the round's result; a second round moves HEAD by a
  conditional replace (If-Match), allowed to the server's key as plain ``s3:PutObject``;
- a round of a job with regions (dags/digits_regions.yaml, each region's store a bucket or prefix of
  its own on the same server) commits with every silo, regional aggregator and the server on its own
  key, while a silo of region eu cannot write into region us's store or the job's partials, and the
  server's key cannot read a region's store;
- the same round with region eu's store on a second S3 endpoint (a moto server process of its own)
  with keys of its own there: eu's aggregator holds both keys (``AWS_*`` and ``AIRFED_REGION_AWS_*``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from airfed.spec import load_spec
from helpers import EXAMPLE_SPEC, REPO
from minio.credentials import StaticProvider
from minio.error import S3Error
from round_steps import SILOS, step
from s3_server import _CLEARED, EnforcingS3, enforcing_s3_server

from fl_tasks import audit, prepare_data
from fl_tasks.__main__ import main as step_main
from fl_tasks.contract import SPEC_ENV
from fl_tasks.policies import JobPolicies, StoreLocation, generate
from fl_tasks.records import Head, Manifest, RegionPartial, RegistrySummary, Result, Verdict
from fl_tasks.regions import REGION_STORE_URL_ENV, region_stores, silos_of
from fl_tasks.store import JobKeys, ObjectMissing, StoreError, open_store
from fl_tasks.store.s3 import MIB, S3Store

BUCKET = "airfed-enforced"
PREFIX = "fl"
#: moto authorises HeadBucket (the server's ``Store.prepare()``) as ``s3:HeadBucket``; AWS and MinIO
#: authorise it as ``s3:ListBucket``, which the generated server policy grants. This statement
#: gives moto's name for the same check and nothing else.
MOTO_HEAD_BUCKET = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:HeadBucket"], "Resource": [f"arn:aws:s3:::{BUCKET}"]}]}


def store_as(s3: EnforcingS3, creds: dict[str, str], at: StoreLocation | None = None) -> S3Store:
    at = at or StoreLocation(BUCKET, PREFIX)
    return S3Store(at.bucket, at.prefix, endpoint=s3.endpoint, region="us-east-1", retries=0,
                   credentials=StaticProvider(creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"]))


def refused(action) -> S3Error:
    """Run ``action``; it must fail with the server's 403 AccessDenied (returned for inspection)."""
    with pytest.raises(StoreError, match="AccessDenied") as info:
        action()
    cause = info.value.__cause__
    assert isinstance(cause, S3Error) and cause.code == "AccessDenied" and cause.response.status == 403, cause
    return cause


@pytest.fixture(scope="module")
def enforcing_s3() -> Iterator[EnforcingS3]:
    with enforcing_s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def identities(enforcing_s3: EnforcingS3) -> tuple[JobPolicies, dict[str, dict[str, str]]]:
    """The digits job's policies, and an IAM user (its key as env vars) per policy."""
    enforcing_s3.create_bucket(BUCKET)
    result = generate(load_spec(EXAMPLE_SPEC), "aws", f"s3://{BUCKET}/{PREFIX}")
    users = {}
    for name, policy in result.policies.items():
        extra = [MOTO_HEAD_BUCKET] if name == result.server else []
        users[name] = enforcing_s3.create_user(name, policy, *extra)
    return result, users


def test_the_server_enforces_policies_at_all(enforcing_s3, identities):
    """The premise: an unknown key is refused, and a known key is held to its policy."""
    result, users = identities
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        store_as(enforcing_s3, {"AWS_ACCESS_KEY_ID": "AKIANOTAUSER", "AWS_SECRET_ACCESS_KEY": "x"}).put_bytes(
            "digits/HEAD.json", b"{}")
    ui = store_as(enforcing_s3, users[result.ui])
    refused(lambda: ui.put_bytes("digits/HEAD.json", b"{}"))
    with pytest.raises(ObjectMissing):  # may read: a missing key reads as missing, not as forbidden
        ui.get_bytes("digits/HEAD.json")


@pytest.mark.parametrize("fmt", ["aws", "minio"])
def test_a_silo_key_writes_its_own_objects_only(enforcing_s3, identities, fmt):
    """Silo ``a`` beside ``ab`` and ``x-a``, job ``digits`` beside ``digits-x``: S3's ``*`` crosses
    ``/``, the generated patterns still pin the silo and the job. (The minio format, which grants no
    listing, is held to the same rules here; moto, like MinIO, answers 404 for a missing key the
    caller may read.)"""
    spec = load_spec(EXAMPLE_SPEC)
    spec = spec.model_copy(update={"silos": [spec.silos[0].model_copy(update={"name": n}) for n in ("a", "ab", "x-a")]})
    policies = generate(spec, fmt, f"s3://{BUCKET}/{PREFIX}")
    user = enforcing_s3.create_user(f"wildcard-silo-a-{fmt}", policies.policies["digits-silo-a"])
    silo_a = store_as(enforcing_s3, user)
    keys, other_job = JobKeys("digits"), JobKeys("digits-x")
    for r in (1, 31):
        for key in (keys.update(r, "a"), keys.manifest(r, "a"), keys.status(r, "a"), keys.verdict(r, "a"),
                    keys.evaluation(r, "a")):
            silo_a.put_bytes(key, b"{}")
            assert silo_a.get_bytes(key) == b"{}"
        for silo in ("ab", "x-a"):
            for key in (keys.update(r, silo), keys.manifest(r, silo), keys.verdict(r, silo)):
                refused(lambda key=key: silo_a.put_bytes(key, b"{}"))
        for key in (other_job.update(r, "a"), other_job.manifest(r, "a")):
            refused(lambda key=key: silo_a.put_bytes(key, b"{}"))
        for key in (keys.head, keys.plan(r), keys.global_model(r), keys.result(r)):
            refused(lambda key=key: silo_a.put_bytes(key, b"{}"))
    with pytest.raises(ObjectMissing):
        silo_a.get_bytes(keys.manifest(99, "a"))


def test_a_large_update_goes_up_in_parts_with_the_silo_key(enforcing_s3, identities, tmp_path):
    """A multipart upload (create, parts, complete) of the silo's own update is allowed; one aimed
    at another silo's key is refused before any part is sent."""
    result, users = identities
    keys = JobKeys("digits")
    store = S3Store(BUCKET, PREFIX, endpoint=enforcing_s3.endpoint, region="us-east-1", retries=0, part_size=5 * MIB,
                    credentials=StaticProvider(users[result.silo_names["us"]]["AWS_ACCESS_KEY_ID"],
                                               users[result.silo_names["us"]]["AWS_SECRET_ACCESS_KEY"]))
    big = tmp_path / "update.safetensors"
    big.write_bytes(bytes(range(256)) * (11 * MIB // 256))  # 11 MiB: three parts of 5 MiB
    sha = store.put_file(keys.update(7, "us"), big)
    assert store.get_file(keys.update(7, "us"), tmp_path / "back", sha) == sha
    refused(lambda: store.put_file(keys.update(7, "eu"), big))


@contextmanager
def acting_as(monkeypatch: pytest.MonkeyPatch, endpoint: str, creds: dict[str, str],
              store: str = f"s3://{BUCKET}/{PREFIX}", region_store: str | None = None) -> Iterator[None]:
    """The env a step's pod would get: the store(s) and this identity's key, nothing else."""
    with monkeypatch.context() as env:
        for name in _CLEARED:
            env.delenv(name, raising=False)
        env.delenv(REGION_STORE_URL_ENV, raising=False)
        if region_store:
            env.setenv(REGION_STORE_URL_ENV, region_store)
        env.setenv("AIRFED_STORE_URL", store)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AIRFED_S3_RETRIES", "0")
        for name, value in creds.items():
            env.setenv(name, value)
        yield


def test_a_round_commits_with_every_step_on_its_own_key(job, enforcing_s3, identities, monkeypatch):
    """Every step of a round as ``python -m fl_tasks`` runs it in a pod, each with its own key; a
    silo's overwrite of another silo's update is refused and the result holds the honest update."""
    result, users = identities
    keys, run = JobKeys(job), "manual__enforced"
    as_server = users[result.server]

    def as_silo(silo: str) -> dict[str, str]:
        return users[result.silo_names[silo]]

    with acting_as(monkeypatch, enforcing_s3.endpoint, as_server):
        assert step("distribute", job, run) == 0
    for silo in SILOS:
        with acting_as(monkeypatch, enforcing_s3.endpoint, as_silo(silo)):
            assert step("train", job, run, 1, silo) == 0
    honest = {s: store_as(enforcing_s3, as_server).get_record(keys.manifest(1, s), Manifest) for s in SILOS}

    # silo asia tries to replace eu's update (and the manifest that vouches for it) and the server's objects
    attacker = store_as(enforcing_s3, as_silo("asia"))
    forged = attacker.get_bytes(keys.update(1, "asia"))  # its own update, readable: a valid safetensors file
    refused(lambda: attacker.put_bytes(keys.update(1, "eu"), forged))
    refused(lambda: attacker.put_record(keys.manifest(1, "eu"), honest["asia"].model_copy(update={"silo": "eu"})))
    refused(lambda: attacker.get_bytes(keys.update(1, "eu")))
    for key in (keys.global_model(2), keys.plan(1), keys.head, keys.result(1)):
        refused(lambda key=key: attacker.put_bytes(key, b"{}"))

    for silo in SILOS:
        with acting_as(monkeypatch, enforcing_s3.endpoint, as_silo(silo)):
            assert step("validate", job, run, 1, silo) == 0
    with acting_as(monkeypatch, enforcing_s3.endpoint, as_server):
        assert step("aggregate", job, run, 1) == 0
    for silo in SILOS:
        with acting_as(monkeypatch, enforcing_s3.endpoint, as_silo(silo)):
            assert step("evaluate", job, run, 1, silo) == 0
    with acting_as(monkeypatch, enforcing_s3.endpoint, as_server):
        assert step("register", job, run, 1) == 0

    ui = store_as(enforcing_s3, users[result.ui])
    head = ui.get_record(keys.head, Head)
    committed = ui.get_record(keys.result(1), Result, head.result_sha256)
    assert head.round == 1 and committed.committed and committed.rejected == {}
    assert {s: a.sha256 for s, a in committed.accepted.items()} == {s: m.sha256 for s, m in honest.items()}
    assert committed.accepted["eu"].sha256 != honest["asia"].sha256
    for silo in SILOS:
        verdict = ui.get_record(keys.verdict(1, silo), Verdict)
        assert verdict.accepted and verdict.update_sha256 == honest[silo].sha256
    assert ui.get_record(keys.registry(1), RegistrySummary).registry_version == 1
    stored = json.loads(ui.get_bytes(keys.manifest(1, "eu")))
    assert stored["silo"] == "eu" and stored["sha256"] == honest["eu"].sha256
    refused(lambda: ui.put_bytes(keys.head, b"{}"))

    # round 2 moves HEAD by a conditional replace (If-Match): plain s3:PutObject for the server's key
    with acting_as(monkeypatch, enforcing_s3.endpoint, as_server):
        assert step("distribute", job, "manual__enforced-2") == 0
    for silo in SILOS:
        with acting_as(monkeypatch, enforcing_s3.endpoint, as_silo(silo)):
            assert step("train", job, "manual__enforced-2", 2, silo) == 0
    with acting_as(monkeypatch, enforcing_s3.endpoint, as_server):
        assert step("aggregate", job, "manual__enforced-2", 2) == 0
    head = ui.get_record(keys.head, Head)
    assert head.round == 2 and head.dag_run_id == "manual__enforced-2"


#: Each region's store on the enforcing server: us and eu in buckets of their own, asia beside the
#: job's objects in the job's bucket (another prefix), so the prefixes must keep them apart too.
REGION_STORES = {"us": "s3://region-us/fl", "eu": "s3://region-eu", "asia": f"s3://{BUCKET}/asia"}


def staged_regional_spec(monkeypatch: pytest.MonkeyPatch, stores: dict[str, str]):
    """dags/digits_regions.yaml with one local epoch and each region's store from ``stores``: its silo
    data created, its payload in the steps' environment."""
    spec = load_spec(REPO / "dags" / "digits_regions.yaml")
    spec = spec.model_copy(update={
        "training": {**spec.training, "local-epochs": 1},
        "regions": [r.model_copy(update={"store": stores[r.name]}) for r in spec.regions]})
    payload = spec.step_payload()
    assert prepare_data.main([payload]) == 0
    monkeypatch.setenv(SPEC_ENV, payload)
    return spec


@pytest.mark.usefixtures("identities")  # the job's bucket
def test_a_regional_round_commits_with_every_region_on_its_own_keys(airfed_home, enforcing_s3, monkeypatch):
    """distribute → per region (distribute_region, train + validate of its silos, aggregate_region) →
    aggregate → per region (publish_region, evaluate, collect_region) → register, each step with the key
    of the identity that runs it in the deployment; then eu's keys try to reach beyond region eu."""
    spec = staged_regional_spec(monkeypatch, REGION_STORES)
    for bucket in ("region-us", "region-eu"):
        enforcing_s3.create_bucket(bucket)
    job_url = f"s3://{BUCKET}/{PREFIX}"
    result = generate(spec, "aws", job_url)
    users = {name: enforcing_s3.create_user(name, policy, *([MOTO_HEAD_BUCKET] if name == result.server else []))
             for name, policy in result.policies.items()}
    job, keys, run = spec.job, JobKeys(spec.job), "manual__regions"

    def run_as(policy: str, argv: list[str], **stores: str) -> int:
        with acting_as(monkeypatch, enforcing_s3.endpoint, users[policy], **stores):
            return step_main([*argv, "--job", job, "--round", "1", "--run-id", run])

    def regional(name: str, region: str) -> int:
        return run_as(result.region_names[region], [name, "--region", region], region_store=REGION_STORES[region])

    def per_silo(name: str, silo: str, region: str) -> int:
        return run_as(result.silo_names[silo], [name, "--silo", silo], store=REGION_STORES[region])

    assert run_as(result.server, ["distribute"]) == 0
    for region in spec.regions:
        assert regional("distribute_region", region.name) == 0
        for silo in silos_of(spec, region.name):
            assert per_silo("train", silo.name, region.name) == 0
            assert per_silo("validate", silo.name, region.name) == 0

    # eu-berlin's key: nothing of region us, nothing of the job's store (partials, its own update there)
    stores = {name: StoreLocation.parse(url, name) for name, url in REGION_STORES.items()}
    berlin = users[result.silo_names["eu-berlin"]]
    as_berlin = {name: store_as(enforcing_s3, berlin, at) for name, at in stores.items()}
    as_berlin["job"] = store_as(enforcing_s3, berlin)
    forged = as_berlin["eu"].get_bytes(keys.update(1, "eu-berlin"))  # its own update: readable in its store
    refused(lambda: as_berlin["us"].put_bytes(keys.update(1, "us-east"), forged))
    refused(lambda: as_berlin["us"].put_bytes(keys.update(1, "eu-berlin"), forged))
    refused(lambda: as_berlin["us"].get_bytes(keys.update(1, "us-east")))
    refused(lambda: as_berlin["asia"].put_bytes(keys.update(1, "asia-tokyo"), forged))
    for region in ("us", "eu"):
        refused(lambda region=region: as_berlin["job"].put_bytes(keys.partial_record(1, region), b"{}"))
    refused(lambda: as_berlin["job"].put_bytes(keys.update(1, "eu-berlin"), forged))
    refused(lambda: as_berlin["eu"].put_bytes(keys.update(1, "eu-paris"), forged))
    # region eu's aggregator key: not us's silos, not us's partial
    eu_aggregator = users[result.region_names["eu"]]
    refused(lambda: store_as(enforcing_s3, eu_aggregator, stores["us"]).get_bytes(keys.update(1, "us-east")))
    refused(lambda: store_as(enforcing_s3, eu_aggregator).put_bytes(f"{keys.round_dir(1)}/regions/us.json", b"{}"))

    for region in spec.regions:
        assert regional("aggregate_region", region.name) == 0
    assert run_as(result.server, ["aggregate"]) == 0
    for region in spec.regions:
        assert regional("publish_region", region.name) == 0
        for silo in silos_of(spec, region.name):
            assert per_silo("evaluate", silo.name, region.name) == 0
        assert regional("collect_region", region.name) == 0
    assert run_as(result.server, ["register"]) == 0

    ui = store_as(enforcing_s3, users[result.ui])
    head = ui.get_record(keys.head, Head)
    committed = ui.get_record(keys.result(1), Result, head.result_sha256)
    assert head.round == 1 and committed.committed and committed.regions is not None
    assert {n for n, o in committed.regions.items() if o.contributed} == {"us", "eu", "asia"}
    assert sorted(committed.accepted) == sorted(s.name for s in spec.silos)
    for silo in spec.silos:  # updates stayed home; their JSON records came up; the honest update was used
        assert not ui.exists(keys.update(1, silo.name))
        assert ui.get_record(keys.verdict(1, silo.name), Verdict).accepted
        assert ui.exists(keys.evaluation(1, silo.name))
        home = store_as(enforcing_s3, users[result.region_names[silo.region or ""]], stores[silo.region or ""])
        assert committed.accepted[silo.name].sha256 == home.get_record(keys.manifest(1, silo.name), Manifest).sha256
    eu = ui.get_record(keys.result(1), Result).regions["eu"]
    assert eu.record is not None and ui.get_record(eu.record.key, RegionPartial).accepted.keys() == {"eu-berlin",
                                                                                                      "eu-paris"}
    assert ui.get_record(keys.registry(1), RegistrySummary).registry_version == 1
    # residency: the server's and the UI's keys cannot read a region's store, even asia's in the job's bucket
    for name in (result.server, result.ui):
        for region in ("eu", "asia"):
            refused(lambda name=name, region=region: store_as(enforcing_s3, users[name], stores[region]).get_bytes(
                keys.update(1, f"{region}-tokyo" if region == "asia" else "eu-berlin")))


@contextmanager
def separate_s3_endpoint() -> Iterator[EnforcingS3]:
    """A second, independent S3 endpoint enforcing IAM: moto's server in a process of its own (moto's
    state is per process, so a second threaded server here would share the first one's buckets and users)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the second S3 endpoint did not start"
                time.sleep(0.2)
        s3 = EnforcingS3(endpoint)
        s3.set_no_auth_budget(0)
        yield s3
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.usefixtures("identities")  # the job's bucket
def test_a_region_on_its_own_s3_endpoint_keeps_its_own_keys(airfed_home, enforcing_s3, monkeypatch):
    """Region eu's store on another S3 endpoint (another MinIO, in the region) with keys of its own there:
    eu's regional aggregator holds two keys, its job-store key as ``AWS_*`` and its region-store key as
    ``AIRFED_REGION_AWS_*`` (what the kubernetes runner gives its pod), and the round commits; without
    the second key the job store's key is never sent to the region's endpoint."""
    eu_store = "s3://region-eu-own/fl"
    # a job store of its own in the module's bucket (the other regional test's job has the same name)
    job_url, job_at = f"s3://{BUCKET}/own", StoreLocation(BUCKET, "own")
    stores = {"us": f"s3://{BUCKET}/own-us", "eu": eu_store, "asia": f"s3://{BUCKET}/own-asia"}
    spec = staged_regional_spec(monkeypatch, stores)
    result = generate(spec, "aws", job_url)
    tag = "own-endpoint-"  # IAM user names of this test on the shared server
    on_job_endpoint = {name: enforcing_s3.create_user(tag + name, policy,
                                                      *([MOTO_HEAD_BUCKET] if name == result.server else []))
                       for name, policy in result.policies.items()}
    job, keys, run = spec.job, JobKeys(spec.job), "manual__own-endpoint"
    eu_silos = [s.name for s in silos_of(spec, "eu")]

    with separate_s3_endpoint() as eu_endpoint:
        eu_endpoint.create_bucket("region-eu-own")
        # region eu's keys on its own endpoint: its aggregator's and each of its silos' generated policy
        eu_identities = [result.region_names["eu"], *(result.silo_names[s] for s in eu_silos)]
        on_eu_endpoint = {name: eu_endpoint.create_user(name, result.policies[name]) for name in eu_identities}

        def run_step(argv: list[str], endpoint: str, creds: dict[str, str], store: str = job_url,
                     region_store: str | None = None, region_env: dict[str, str] | None = None) -> int:
            with acting_as(monkeypatch, endpoint, creds, store=store, region_store=region_store), \
                    monkeypatch.context() as env:
                for name, value in (region_env or {}).items():
                    env.setenv(name, value)
                return step_main([*argv, "--job", job, "--round", "1", "--run-id", run])

        def regional(step_name: str, region: str, region_env: dict[str, str] | None = None) -> int:
            identity = result.region_names[region]
            if region == "eu" and region_env is None:
                key = on_eu_endpoint[identity]
                region_env = {"AIRFED_REGION_AWS_ENDPOINT_URL": eu_endpoint.endpoint,
                              "AIRFED_REGION_AWS_ACCESS_KEY_ID": key["AWS_ACCESS_KEY_ID"],
                              "AIRFED_REGION_AWS_SECRET_ACCESS_KEY": key["AWS_SECRET_ACCESS_KEY"]}
            return run_step([step_name, "--region", region], enforcing_s3.endpoint, on_job_endpoint[identity],
                            region_store=stores[region], region_env=region_env)

        def per_silo(step_name: str, silo: str, region: str) -> int:
            identity = result.silo_names[silo]
            if region == "eu":
                return run_step([step_name, "--silo", silo], eu_endpoint.endpoint, on_eu_endpoint[identity],
                                store=eu_store)
            return run_step([step_name, "--silo", silo], enforcing_s3.endpoint, on_job_endpoint[identity],
                            store=stores[region])

        assert run_step(["distribute"], enforcing_s3.endpoint, on_job_endpoint[result.server]) == 0
        # eu's aggregator with the job store's settings only: the region's bucket is not on that endpoint
        with pytest.raises(StoreError, match=f"region-eu-own/.* failed at {enforcing_s3.endpoint}: NoSuchBucket"):
            regional("distribute_region", "eu", region_env={})
        # the region's endpoint named without a key of its own: refused before any request
        with pytest.raises(ValueError, match="the region's store needs its own key; the job store's is not sent"):
            regional("distribute_region", "eu", region_env={"AIRFED_REGION_AWS_ENDPOINT_URL": eu_endpoint.endpoint})
        for region in spec.regions:
            assert regional("distribute_region", region.name) == 0
            for silo in silos_of(spec, region.name):
                assert per_silo("train", silo.name, region.name) == 0
                assert per_silo("validate", silo.name, region.name) == 0
            assert regional("aggregate_region", region.name) == 0
        assert run_step(["aggregate"], enforcing_s3.endpoint, on_job_endpoint[result.server]) == 0
        for region in spec.regions:
            assert regional("publish_region", region.name) == 0
            for silo in silos_of(spec, region.name):
                assert per_silo("evaluate", silo.name, region.name) == 0
            assert regional("collect_region", region.name) == 0
        assert run_step(["register"], enforcing_s3.endpoint, on_job_endpoint[result.server]) == 0

        ui = store_as(enforcing_s3, on_job_endpoint[result.ui], job_at)
        head = ui.get_record(keys.head, Head)
        committed = ui.get_record(keys.result(1), Result, head.result_sha256)
        assert head.round == 1 and committed.committed and committed.regions is not None
        assert {n for n, o in committed.regions.items() if o.contributed} == {"us", "eu", "asia"}
        assert sorted(committed.accepted) == sorted(s.name for s in spec.silos)
        # eu's updates live on eu's endpoint only, checksums as the aggregator verified them
        eu_aggregator = on_eu_endpoint[result.region_names["eu"]]
        at_home = store_as(eu_endpoint, eu_aggregator, StoreLocation.parse(eu_store, "eu"))
        for silo in eu_silos:
            assert committed.accepted[silo].sha256 == at_home.get_record(keys.manifest(1, silo), Manifest).sha256
            assert not ui.exists(keys.update(1, silo))
        with pytest.raises(ObjectMissing, match="bucket 'region-eu-own' does not exist"):  # not on the job's endpoint
            store_as(enforcing_s3, enforcing_s3.admin_env(), StoreLocation.parse(eu_store, "eu")).get_bytes(
                keys.update(1, eu_silos[0]))

        # airfed verify as an auditor: a key for the job's endpoint, and eu's under AIRFED_REGION_EU_
        eu_key = on_eu_endpoint[result.region_names["eu"]]
        auditor = enforcing_s3.admin_env()
        with acting_as(monkeypatch, enforcing_s3.endpoint, auditor, store=job_url), monkeypatch.context() as env:
            env.setenv("AIRFED_REGION_EU_AWS_ENDPOINT_URL", eu_endpoint.endpoint)
            env.setenv("AIRFED_REGION_EU_AWS_ACCESS_KEY_ID", eu_key["AWS_ACCESS_KEY_ID"])
            env.setenv("AIRFED_REGION_EU_AWS_SECRET_ACCESS_KEY", eu_key["AWS_SECRET_ACCESS_KEY"])
            job_store = open_store(job_url)
            lines: list[str] = []
            assert audit.verify_job(job_store, job, audit.Report(lines.append), all_rounds=True,
                                    region_stores=region_stores(spec, job_store)) == [1], lines
