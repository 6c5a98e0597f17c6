"""The S3 store's error taxonomy, from minio's public error types only (no server needed)."""

from __future__ import annotations

from minio.error import InvalidResponseError

from fl_tasks.store.s3 import S3Store


def test_non_s3_responses_are_classified_by_their_status():
    store = S3Store("bucket", "prefix", endpoint="http://127.0.0.1:9", retries=0)
    kind, reason = store._classify(InvalidResponseError(503, "text/html", "<html>busy</html>"))
    assert kind == "transient" and "HTTP 503" in reason
    kind, reason = store._classify(InvalidResponseError(403, "text/html", "<html>proxy says no</html>"))
    assert kind == "permanent" and "HTTP 403" in reason and "AWS_ENDPOINT_URL" in reason
