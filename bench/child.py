"""`python -m bench.child SPEC.json`: one `pipeline.driver.run` in a process of its own, for the pipeline benchmarks.

SPEC: {"config": RunConfig fields, "fixed": bool (bench.fixed_labeler's labeler, no model)}. Prints one JSON line:
the run's summary, its wall time, and the driver's peak resident memory (VmHWM of this process: the driver's own,
Ray's processes not counted), so that a benchmark measures a driver as a user runs one.
"""

from __future__ import annotations

import json
import logging
import sys
import time


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
                      "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main(sys.argv[1])
