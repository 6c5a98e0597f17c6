"""A real S3 endpoint on loopback for tests: moto's threaded server.

Import the fixtures from a conftest or a test module (``tests/`` is on ``sys.path`` under pytest's
prepend import mode)::

    from s3_server import s3_endpoint, s3_store_url  # noqa: F401
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

# Env vars that would leak a developer's real AWS setup into the tests.
_CLEARED = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AIRFED_S3_RETRIES",
    "AIRFED_S3_BACKOFF",
)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, str]]:
    """Start moto's S3 server on 127.0.0.1 (free port) for the session; yield the env vars to use it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "airfed-test-key",
            "AWS_SECRET_ACCESS_KEY": "airfed-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


@pytest.fixture
def s3_store_url(s3_endpoint: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://<unique bucket>/test`` (bucket not created yet) with the server's env applied."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_endpoint.items():
        monkeypatch.setenv(name, value)
    return f"s3://airfed-{uuid.uuid4().hex[:12]}/test"


class EnforcingS3:
    """moto's S3 server with IAM enforced on every request: keys of IAM users, each allowed only
    what its policies say (403 AccessDenied otherwise, InvalidAccessKeyId for an unknown key).

    moto checks S3 requests against IAM once its "no-auth" request budget is spent
    (``INITIAL_NO_AUTH_ACTION_COUNT``, set at run time through its ``/moto-api/reset-auth``
    endpoint). An admin user, created while the budget is still open, sets everything else up.
    The setting is process-wide: :func:`enforcing_s3_server` restores it on exit.
    """

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self._boto3 = boto3
        self.admin = self._iam_client(None).create_access_key(UserName=self._admin_user())["AccessKey"]

    def _iam_client(self, key: dict | None) -> Any:
        creds = ({"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
                 if key else {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"})
        return self._boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", **creds)

    def _admin_user(self) -> str:
        iam = self._iam_client(None)
        iam.create_user(UserName="airfed-test-admin")
        iam.put_user_policy(UserName="airfed-test-admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        return "airfed-test-admin"

    def create_user(self, name: str, *policies: dict) -> dict[str, str]:
        """An IAM user with ``policies`` attached inline; returns its key as AWS_* env vars."""
        iam = self._iam_client(self.admin)
        iam.create_user(UserName=name)
        for i, policy in enumerate(policies):
            iam.put_user_policy(UserName=name, PolicyName=f"{name}-{i}", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def admin_env(self) -> dict[str, str]:
        """The admin user's key as AWS_* env vars (allowed everything)."""
        return {"AWS_ACCESS_KEY_ID": self.admin["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": self.admin["SecretAccessKey"]}

    def create_bucket(self, bucket: str) -> None:
        self._boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.admin["AccessKeyId"], aws_secret_access_key=self.admin["SecretAccessKey"],
        ).create_bucket(Bucket=bucket)

    def set_no_auth_budget(self, requests_without_auth: float) -> float:
        """moto's public switch: requests served before IAM is enforced (0: from now on); returns
        the previous budget."""
        import urllib.request

        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth",
                                         data=str(requests_without_auth).encode(), method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return float(json.loads(response.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])


@contextmanager
def enforcing_s3_server() -> Iterator[EnforcingS3]:
    """A moto server of its own on 127.0.0.1 that enforces IAM on S3 requests (see :class:`EnforcingS3`)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = EnforcingS3(f"http://{host}:{port}")
    previous = s3.set_no_auth_budget(0)
    try:
        yield s3
    finally:
        s3.set_no_auth_budget(previous)
        server.stop()
