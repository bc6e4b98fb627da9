"""`python -m bench.child SPEC.json`: one `pipeline.driver.run` in a process of its own, for the pipeline benchmarks;
and `run_child`, the benchmark's side: it starts that process and watches its output directory.

SPEC: {"config": RunConfig fields, "fixed": bool (bench.fixed_labeler's labeler, no model)}. Prints one JSON line:
the run's summary, its wall time, and the driver's peak resident memory (VmHWM of this process: the driver's own,
Ray's processes not counted), so that a benchmark measures a driver as a user runs one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (VmHWM), where /proc says it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def census(top: int = 12) -> dict:
    """Where this process's memory is, as far as Python can see it (cheap, once at the end of a run): its Python heap
    (blocks allocated by pymalloc), Arrow's memory pool, and the live objects of the most common types, so that a
    driver whose peak grows with the corpus shows which of them grew (bench.scale compares two runs)."""
    import collections
    import gc

    import pyarrow as pa

    gc.collect()
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    return {"python_blocks": sys.getallocatedblocks(), "arrow_bytes": pa.total_allocated_bytes(),
            "objects": dict(counts.most_common(top)), "rss_bytes": rss_bytes()}


def rss_bytes() -> int | None:
    """This process's resident set now (VmRSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(path: str) -> None:
    from pipeline.config import RunConfig
    from pipeline.driver import run

    logging.basicConfig(level=logging.WARNING)
    with open(path) as f:
        spec = json.load(f)
    labeler = None
    if spec.get("fixed"):
        from bench.fixed_labeler import FixedLabeler

        labeler = FixedLabeler
    start = time.time()
    summary = run(RunConfig(**spec["config"]), labeler)
    print(json.dumps({"summary": summary, "wall_s": time.time() - start, "started_at": start,
                      "peak_rss_bytes": peak_rss_bytes(), "census": census()}))


def run_child(config: dict, out: Path, work: Path, fixed: bool = False, poll_s: float = 0.05) -> dict:
    """pipeline.driver.run(RunConfig(**config)) in a process of its own (bench.child), watched from here: its summary,
    wall time and driver peak RSS, the seconds from its start to its first committed part file, and its steady
    rate (rows committed between its first and last part file, over that time)."""
    spec = work / f"spec-{uuid.uuid4().hex[:8]}.json"
    spec.write_text(json.dumps({"config": config, "fixed": fixed}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.time()  # part files written before it are an earlier run's (--overwrite removes them, not at once)
    proc = subprocess.Popen([sys.executable, "-m", "bench.child", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and any(_written_since(e, start) for e in os.scandir(out)):
            first = time.time() - start
        time.sleep(poll_s)
    reader.join(30)
    if proc.returncode != 0:
        raise RuntimeError(f"the pipeline run failed (exit {proc.returncode}); see its log above")
    result = json.loads(lines[-1])
    result.update(first_commit_s=first, process_wall_s=time.time() - start,
                  steady_rows_per_s=steady_rate(out, start))
    return result


def _written_since(entry: os.DirEntry, since: float) -> bool:
    """A part file written at `since` or later (one that --overwrite removes as it is looked at is not)."""
    try:
        return entry.name.startswith("part-") and entry.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def steady_rate(out: Path, since: float = 0.0) -> float | None:
    """Rows committed after the run's first part file and up to its last, over the time between them (the
    pipeline's rate once it runs, its start-up left out); files written before `since` are an earlier run's."""
    import pyarrow.parquet as pq

    files = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in out.glob("part-*.parquet")
                   if p.stat().st_mtime >= since)
    if len(files) < 2 or files[-1][0] <= files[0][0]:
        return None
    return sum(n for _, n in files[1:]) / (files[-1][0] - files[0][0])


def mb(n: int | None) -> float | None:
    """Bytes -> MiB, None kept (a child's peak_rss_bytes -> the driver_peak_rss_mb columns)."""
    return None if n is None else n / 2**20


if __name__ == "__main__":
    main(sys.argv[1])
