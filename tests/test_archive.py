"""Archive scale (slow: `pytest -m slow tests/test_archive.py`): a 2-hour video over 1 GiB, on a local disk and in
the S3 fixture, labelled by `lavi-label run` with 1 and 2 decode workers.

Each run is its own driver process with its own local Ray, so that every process the run starts is a descendant
of the driver and is measured alone: the peak resident memory (VmHWM) of the driver, of each Ray worker that ran
decode tasks and of each isolated decoder child, sampled by a watcher thread. Bytes read are the run's own count
(`_summary.json`: what its probes and groups fetched) and, on S3, what the server sent through a counting proxy.
The labeler (a tiny random LaVi on CPU) bounds a whole run's clips/s, so the split and decode stages are also timed
alone, on the session's Ray, with 1 and 2 decode tasks at once. The figures go to $LAVI_ARCHIVE_FIGURES (JSON) when
set, and to the log.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import media
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]
log = logging.getLogger(__name__)

HOURS, FPS, SIZE, CLIP_S = 2, 4, 64, 5.0
PAD = 170_000  # bytes/s of interleaved audio noise: 2 hours of it is 1.22 GB
CLIPS = int(HOURS * 3600 / CLIP_S)
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The 2-hour MP4 (index at the end, as a camera or encoder writes it), deleted afterwards."""
    path = tmp_path_factory.mktemp("archive") / "archive.mp4"
    size = media.long_mp4(path, HOURS * 3600, fps=FPS, size=SIZE, gop=2 * FPS, pad_bytes_per_s=PAD)
    assert size > 1 << 30
    yield path, size
    path.unlink()


class Watch:
    """Peak memory of a process and its descendants, by role, sampled every `every_s` seconds (VmHWM is the kernel's
    own peak, so a short spike between samples still counts, if its process is seen once)."""

    def __init__(self, pid: int, every_s: float = 0.25):
        self.pid, self.every_s = pid, every_s
        self.peak_kb: dict[int, int] = {}
        self.roles: dict[int, set[str]] = {}  # a Ray worker that ran decode tasks may host the labeler later
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            tree = _descendants(self.pid)
            if not tree:
                return
            for pid in tree:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                               if line.startswith("VmHWM:"))
                except (OSError, StopIteration):  # gone meanwhile
                    continue
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), hwm)
                role = ("driver" if pid == self.pid else "isolated decoder" if "_child_main" in cmd
                        else "decode worker" if "decode_units" in cmd else "labeler" if "Labeler" in cmd else None)
                if role:
                    self.roles.setdefault(pid, set()).add(role)

    def stop(self) -> dict[str, list[int]]:
        """Peaks in MiB by role ("decode worker+labeler": one process that was both in turn), largest first."""
        self._stop.set()
        self._thread.join()
        out: dict[str, list[int]] = {}
        for pid, roles in self.roles.items():
            out.setdefault("+".join(sorted(roles)), []).append(round(self.peak_kb[pid] / 1024))
        return {role: sorted(v, reverse=True) for role, v in sorted(out.items())}


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (from /proc), or [] when root is gone."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    if root not in parent:
        return []
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        tree += frontier
    return tree


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 endpoint that counts the bytes the server sends."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.sent = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


def _label(uri: str, out: Path, model: str, decode_workers: int, storage: list[str]) -> dict:
    """One `lavi-label run` in its own driver process (its own local Ray); returns its figures."""
    args = [sys.executable, "-m", "jobs.run", uri, "--out", str(out), "--model", model, "--max-new-tokens", "2",
            "--clip-seconds", str(CLIP_S), "--decode-workers", str(decode_workers), "--no-report", *storage]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    watch = Watch(proc.pid)
    stdout, stderr = proc.communicate(timeout=2400)
    peaks = watch.stop()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    table = pq.read_table(out, columns=["row_id", "clip_index", "status"])
    assert table.num_rows == CLIPS and len(set(table.column("row_id").to_pylist())) == CLIPS  # each clip once
    assert sorted(table.column("clip_index").to_pylist()) == list(range(CLIPS))
    assert set(table.column("status").to_pylist()) <= {"ok", "truncated"}
    run = summary["this_run"]
    return {"decode_workers": decode_workers, "clips": CLIPS, "wall_s": run["wall_s"],
            "process_wall_s": round(time.monotonic() - start, 1), "clips_per_s": round(CLIPS / run["wall_s"], 2),
            "units": run["units"], "bytes_read": run["bytes_read"], "peak_rss_mib": peaks}


def _decode_only(uri: str, storage_options: dict, image_size: int, workers: int) -> dict:
    """The split and decode stages alone (no labeler) over Ray Data tasks, `workers` decode tasks at once: what
    the decode side does when it is not waiting for the labeler."""
    import pyarrow as pa
    import ray.data

    from schemas.manifest import ITEM_SCHEMA, make_item
    from workers.settings import DecodeSettings
    from workers.split import split_batch
    from workers.units import decode_units

    settings = DecodeSettings(image_size=image_size, clip_seconds=CLIP_S, storage_options=storage_options)
    start = time.monotonic()
    items = pa.Table.from_pylist([make_item(uri, [{"task": "caption", "prompt": None}])], schema=ITEM_SCHEMA)
    units = split_batch(items, settings)
    ds = ray.data.from_arrow(units).repartition(target_num_rows_per_block=1).map_batches(
        decode_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"settings": settings}, num_cpus=0.5,
        compute=ray.data.TaskPoolStrategy(size=workers))
    rows = [b for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    wall = time.monotonic() - start
    clips = sum(b.num_rows for b in rows)
    assert clips == CLIPS and sum(b.column("status").to_pylist().count("ok") for b in rows) == CLIPS
    return {"decode_workers": workers, "wall_s": round(wall, 1), "clips_per_s": round(clips / wall, 1),
            "bytes_read": sum(sum(b.column("_bytes_read").to_pylist()) for b in rows)}


def test_a_two_hour_archive_file(archive, s3_server, tiny_model, ray_local, tmp_path):
    """Guards against an archive file that is refused (over 1 GiB), read whole into one worker's memory or more
    than about once, labelled with clips missing or twice, or decoded by one task while the others wait."""
    path, size = archive
    figures: dict = {"file": {"bytes": size, "hours": HOURS, "fps": FPS, "frame": f"{SIZE}x{SIZE}",
                              "clips": CLIPS, "clip_seconds": CLIP_S, "clips_per_group": 16}, "runs": []}
    fs = s3_server.fs()
    key = f"{s3_server.bucket}/archive/archive.mp4"
    t = time.monotonic()
    fs.put_file(str(path), key)
    figures["s3_upload_s"] = round(time.monotonic() - t, 1)
    proxy = CountingProxy(s3_server.endpoint)
    storage = ["--storage-option", f"key={s3_server.key}", "--storage-option", f"secret={s3_server.secret}",
               "--storage-option", f"client_kwargs.endpoint_url={proxy.endpoint}"]
    try:
        for where, uri, flags in (("local", str(path), []), ("s3", f"s3://{key}", storage)):
            for workers in (1, 2):
                before = proxy.sent
                run = _label(uri, tmp_path / f"out-{where}-{workers}", tiny_model, workers, flags)
                run["storage"] = where
                if where == "s3":
                    run["bytes_sent_by_s3"] = proxy.sent - before
                run["bytes_read_over_size"] = round(run["bytes_read"] / size, 3)
                log.info("archive run: %s", run)
                figures["runs"].append(run)
        from pipeline.models import model_info

        size_in = model_info(tiny_model)["image_size"]
        for where, uri, opts in (("local", str(path), {}), ("s3", f"s3://{key}", s3_server.storage_options)):
            for workers in (1, 2):
                figures.setdefault("decode_only", []).append(
                    {"storage": where, **_decode_only(uri, opts, size_in, workers)})
                log.info("decode only: %s", figures["decode_only"][-1])
    finally:
        proxy.close()
        fs.rm(key)
    if os.environ.get("LAVI_ARCHIVE_FIGURES"):
        Path(os.environ["LAVI_ARCHIVE_FIGURES"]).write_text(json.dumps(figures, indent=2) + "\n")
    log.info("archive figures: %s", json.dumps(figures))
    for run in figures["runs"]:
        assert 0.95 * size < run["bytes_read"] < 1.15 * size, run
        assert run.get("bytes_sent_by_s3", size) < 1.2 * size, run
        for role in ("decode worker", "isolated decoder"):  # a process that was only that: far under the file
            assert run["peak_rss_mib"][role] and max(run["peak_rss_mib"][role]) < size / 4 / 2**20, run
