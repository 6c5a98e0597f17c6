"""A real S3 endpoint on loopback for tests: moto's threaded server.

Import the fixtures from a conftest or a test module (``tests/`` is on ``sys.path`` under pytest's
prepend import mode)::

    from s3_server import s3_endpoint, s3_store_url  # noqa: F401
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

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
