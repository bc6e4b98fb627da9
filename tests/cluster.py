"""A real two-node Ray cluster on this machine, for the `ray_cluster` tests.

    head:   `ray start --head --block --node-ip-address=127.0.0.1 ...` with
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (every listener on loopback), free ports for
            every service, a fresh --temp-dir, token auth (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN)
    worker: `ray start --address=<hostname>:<port> --block` without that variable (it makes a
            worker node abort), joining by a hostname that resolves to 127.0.0.1

Both run under subprocess.Popen and are stopped by SIGTERM to the PIDs started here (never
`ray stop`: it kills every Ray process on the machine by name). Killing a node kills its
process tree by PID, log monitor included (it is orphaned otherwise). No psutil: /proc.
See shared/SERVICES.md for why each flag is there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import requests

RAY = str(Path(sys.executable).parent / "ray")
# a loaded 2-core machine starts agents slowly: give the raylet longer before it gives up on them
SLOW_MACHINE = {"RAY_agent_register_timeout_ms": "180000", "RAY_raylet_start_wait_time_s": "180"}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 outside Ray's worker port range (10002-19999)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port
    raise RuntimeError("no free port outside 10002-19999 on 127.0.0.1")


def loopback_hostname() -> str | None:
    """This machine's hostname if it resolves to 127.0.0.1 (how a second node joins), else None."""
    name = socket.gethostname()
    try:
        return name if socket.gethostbyname(name) == "127.0.0.1" else None
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@dataclasses.dataclass
class RayCluster:
    """A running head (and worker nodes); `address` is the Jobs API URL, `env` a client's environment."""

    address: str  # http://127.0.0.1:<dashboard port>
    gcs_address: str  # 127.0.0.1:<gcs port>
    token: str
    temp_dir: str
    head: subprocess.Popen
    workers: list[subprocess.Popen]
    logs: Path

    @property
    def env(self) -> dict[str, str]:
        """A client process environment: the cluster's token, no address defaults."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   AWS_EC2_METADATA_DISABLED="true")
        return env

    def get(self, path: str, timeout: float = 10) -> dict:
        r = requests.get(self.address + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict | None = None, timeout: float = 10) -> dict:
        r = requests.post(self.address + path, json=body, headers={"Authorization": f"Bearer {self.token}"},
                          timeout=timeout)
        r.raise_for_status()
        return r.json()

    def hold_cpus(self, cpus: float, timeout: float = 120) -> str:
        """A Ray job that does nothing but hold `cpus` CPUs (its entrypoint asks for them: Ray runs it on a node
        that has them), so that the other jobs' tasks are placed elsewhere; returns its id, for `release`."""
        job = self.post("/api/jobs/", {"entrypoint": f"{sys.executable} -c 'import time; time.sleep(3600)'",
                                       "entrypoint_num_cpus": cpus})["submission_id"]
        deadline = time.monotonic() + timeout
        while self.get(f"/api/jobs/{job}")["status"] != "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job holding {cpus} CPUs did not start in {timeout} s")
            time.sleep(0.5)
        return job

    def release(self, job: str) -> None:
        """Stop a `hold_cpus` job."""
        self.post(f"/api/jobs/{job}/stop")

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the state API (node_ip, resources_total, ...)."""
        data = self.get("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        return [n for n in data if n["state"] == "ALIVE"]

    def add_worker(self, num_cpus: int = 1, timeout: float = 300) -> subprocess.Popen:
        """Start one more node (`ray start --address=<hostname>:<gcs port> --block`) and wait for it."""
        host = loopback_hostname()
        if host is None:
            raise RuntimeError("the hostname does not resolve to 127.0.0.1: no second node on this machine")
        before = len(self.alive_nodes())
        env = {**self.env, **SLOW_MACHINE}
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # makes a worker node abort
        port = self.gcs_address.rsplit(":", 1)[1]
        # its own temp dir: nodes sharing one would share runtime_resources/, and one node's
        # runtime env agent deletes a working_dir the other node's job is running in
        temp_dir = f"{self.temp_dir}/w{len(self.workers)}"
        cmd = [RAY, "start", f"--address={host}:{port}", "--block", f"--num-cpus={num_cpus}",
               "--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               *_agent_ports()]
        log = open(self.logs / f"worker-{len(self.workers)}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.workers.append(proc)
        _wait(lambda: len(self.alive_nodes()) > before, timeout, proc, log.name, "the worker node to join")
        return proc

    def node_pids(self, proc: subprocess.Popen) -> list[int]:
        """The processes of the node started by `proc`: raylet, agents, log monitor, workers."""
        return children(proc.pid)

    def find(self, text: str, proc: subprocess.Popen | None = None) -> list[int]:
        """PIDs under one node (or all) whose command line contains `text` (Ray sets worker titles)."""
        roots = [proc] if proc else [self.head, *self.workers]
        return [pid for root in roots for pid in children(root.pid) if text in cmdline(pid)]

    def kill_node(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node's whole process tree by PID, the way a machine dies (log monitor included)."""
        pids = self.node_pids(proc)
        kill([proc.pid, *pids])
        proc.wait(30)
        kill(self.node_pids(proc) + [p for p in pids if Path(f"/proc/{p}").exists()])
        self.workers.remove(proc)

    def stop(self) -> None:
        """SIGTERM every node started here at once, wait, then SIGKILL whatever is left of them."""
        nodes = [*self.workers, self.head]
        pids = [p for proc in nodes for p in self.node_pids(proc)]
        for proc in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kill([p for p in pids if "ray" in cmdline(p)])  # survivors only: a reused PID has another cmdline
        self.workers.clear()
        if os.environ.get("LAVI_TEST_KEEP_RAY") != "1":  # keep the session logs for a post-mortem
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _agent_ports() -> list[str]:
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


def _wait(ready, timeout: float, proc: subprocess.Popen, log: str, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}) waiting for {what}: "
                               f"{Path(log).read_text(errors='replace')[-3000:]}")
        try:
            if ready():
                return
        except (requests.RequestException, KeyError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}: "
                       f"{Path(log).read_text(errors='replace')[-3000:]}")


def start_cluster(token: str, head_cpus: int = 2, timeout: float = 600, attempts: int = 2) -> RayCluster:
    """Start a head node on loopback with token auth; returns when its Jobs API accepts requests.

    On a loaded machine a raylet can give up waiting for its agents (`ray start` exits 1,
    "timed out during startup"): start again, up to `attempts` times."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_head(token, head_cpus, timeout)
        except RuntimeError as err:
            if attempt == attempts:
                raise
            warnings.warn(f"Ray head did not start (attempt {attempt}/{attempts}), retrying: {str(err)[-500:]}")
    raise AssertionError("unreachable")


def _start_head(token: str, head_cpus: int, timeout: float) -> RayCluster:
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: socket paths have a length limit
    logs = Path(temp_dir) / "fixture-logs"
    logs.mkdir()
    gcs_port, dashboard_port = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={free_port()}", f"--num-cpus={head_cpus}",
           "--object-store-memory=100000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *_agent_ports()]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", AWS_EC2_METADATA_DISABLED="true", **SLOW_MACHINE)
    log = open(logs / "head.log", "wb")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    cluster = RayCluster(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}", token, temp_dir,
                         head, [], logs)
    try:
        # the dashboard answers a moment before the job agent exists: wait for the jobs endpoint
        _wait(lambda: isinstance(cluster.get("/api/jobs/"), list) and len(cluster.alive_nodes()) == 1,
              timeout, head, log.name, "the head's Jobs API")
    except BaseException:
        cluster.stop()
        raise
    return cluster


if __name__ == "__main__":  # manual check: python tests/cluster.py
    import secrets

    c = start_cluster(secrets.token_hex(16))
    try:
        c.add_worker()
        print(json.dumps([(n["node_ip"], n["resources_total"]) for n in c.alive_nodes()]))
    finally:
        c.stop()
