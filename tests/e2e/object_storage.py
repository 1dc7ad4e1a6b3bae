"""A real S3-compatible server on loopback for the tests: moto's server mode (`python -m moto.server`).

The runs reach it as any S3 endpoint, through pyarrow's S3 filesystem configured by the environment
(AWS_ENDPOINT_URL and credentials), not through a mock of the client. Missing moto skips, and fails under
CI=true (CI installs it from requirements-dev.lock).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from service.testing import ServerProcess, start_process

ACCESS_KEY, SECRET_KEY, REGION = "metta-test", "metta-test-secret", "us-east-1"


def require_module(name: str, install: str) -> None:
    """Skip without the Python package; fail under CI=true, which installs requirements-dev.lock."""
    if importlib.util.find_spec(name) is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def start_s3_server(log_dir: Path) -> ServerProcess:
    require_module("moto", "pip install 'moto[server]', pinned in requirements-dev.lock")
    return start_process(["-m", "moto.server"], log_dir, name="moto-s3", ready_path="/", ready_timeout=60)


def s3_environment(server: ServerProcess) -> dict[str, str]:
    """What a run needs to reach the server: read by pyarrow's S3 filesystem (the AWS SDK's variables)."""
    return {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


def upload(server: ServerProcess, bucket: str, objects: dict[str, bytes]) -> None:
    """Create the bucket (if new) and put each key's bytes, as a client of the server would."""
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                           endpoint_override=server.url, allow_bucket_creation=True)
    s3.create_dir(bucket)
    for key, data in objects.items():
        with s3.open_output_stream(f"{bucket}/{key}") as stream:
            stream.write(data)
