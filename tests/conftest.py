"""Shared pytest fixtures."""

import logging
import urllib.request

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """Run moto's S3 server on a free local port; yield the env vars that point dfu_ml at it."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO, which drowns test output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {
            "DFU_S3_ENDPOINT": f"{host}:{port}",
            "DFU_S3_ACCESS_KEY": "testing",
            "DFU_S3_SECRET_KEY": "testing",
            "DFU_S3_SECURE": "false",
        }
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the DFU_S3_* variables at the moto server and start from an empty store."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DFU_S3_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    # moto's state is process-global; reset it so each test sees no buckets.
    reset = urllib.request.Request(
        f"http://{s3_server['DFU_S3_ENDPOINT']}/moto-api/reset", method="POST"
    )
    with urllib.request.urlopen(reset, timeout=10) as response:
        assert response.status == 200
    return dict(s3_server)


# Training tests (test_resampling, test_clinical_rf, test_stages, ...): quiet TensorFlow start-up
# (must happen before keras is imported) and session-wide synthetic datasets.
import os  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from fixtures_data import prepared_synthetic, synthetic_dir  # noqa: E402,F401
