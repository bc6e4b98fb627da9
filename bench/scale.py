"""`lavi-label bench pipeline --scale 100000,1000000`: the pipeline's own costs at corpus sizes, without a model.

Each size is a corpus of that many images of a few KB (a few hundred small shapes-v1 JPEGs, hard-linked under
distinct names: distinct uris, distinct items, no gigabytes of disk), listed from a JSONL manifest and labelled by
`lavi-label run`'s pipeline with bench.fixed_labeler (the real labeler's bookkeeping, a fixed text for an answer),
in a process of its own (bench.child). Measured per size: wall time, images/s through list, read, decode and
commit, the time to the first committed row, and the driver's peak resident memory. Then, at the largest size,
`resume_left` new images are added to its manifest and the run is repeated into the same output (every earlier item
committed: decided per listing shard): its wall time. And the commit path alone: workers.commit.commit_rows over
labelled blocks, in this process (rows/s).

Targets (2-core CPU): >= 1,000 images/s; commits alone >= 20,000 rows/s; driver peak RSS at 1M items within 10% of
at 100k and under 1 GB; first committed row within 30 s for 1M items; a resume of 1M committed + 1,000 left within
30 s.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.child import mb, run_child
from bench.report import (command_line, device_description, section_head, table, versions, write_json,
                          write_section)

BASE_IMAGES = 256  # distinct JPEGs behind the hard links
DIR_ITEMS = 10_000  # hard links per directory


def scale_corpus(root: Path, n: int, start: int = 0, seed: int = 0) -> Path:
    """n more images (numbered from `start`) under root/images, and their manifest lines appended to
    root/manifest.jsonl; returns the manifest."""
    base = root / "base"
    if not base.exists():
        from shapes.corpus import write_corpus

        write_corpus(str(base), 4 * BASE_IMAGES, 0, seed)
    jpegs = sorted((base / "images").glob("*.jpg"))[:BASE_IMAGES]
    manifest = root / "manifest.jsonl"
    with open(manifest, "a") as out:
        for i in range(start, start + n):
            d = root / "images" / f"{i // DIR_ITEMS:05d}"
            if i % DIR_ITEMS == 0 or i == start:
                d.mkdir(parents=True, exist_ok=True)
            path = d / f"{i:08d}.jpg"
            os.link(jpegs[i % len(jpegs)], path)
            out.write(json.dumps({"uri": str(path)}) + "\n")
    return manifest


def commit_alone(rows: int = 51_200, block: int = 256) -> dict:
    """commit_rows over labelled blocks of `block` rows (one whole image unit a row), into a scratch directory:
    the commit path's rows/s in one process."""
    import datetime as dt

    import pyarrow as pa

    from schemas.clips import BYTES_READ, GROUP, GROUPS, ITEM_ROWS, READ_RETRIES
    from schemas.manifest import SHARD
    from schemas.rows import item_id, metadata, row_id, table_from_rows
    from workers.commit import CommitSpec, commit_rows
    from workers.parts import shard_id

    now = dt.datetime.now(dt.timezone.utc)
    scratch = Path(tempfile.mkdtemp(prefix="lavi-commit-"))
    spec = CommitSpec(out=str(scratch), metadata=metadata("bench", {}, "bench"), rows_per_file=5000)
    blocks = []
    for b in range(rows // block):
        ids = [item_id(f"/x/{b}/{i}.jpg") for i in range(block)]
        table = table_from_rows([{
            "row_id": row_id(i, None, "p", "caption"), "item_id": i, "uri": f"/x/{i}.jpg", "media_type": "image",
            "clip_index": None, "clip_start_s": None, "clip_end_s": None, "frame_timestamps_s": None, "width": 128,
            "height": 128, "task": "caption", "prompt": "describe the image.", "text": "a fixed caption",
            "status": "ok", "error_stage": None, "error": None, "num_prompt_tokens": 0, "num_generated_tokens": 1,
            "model": "bench", "job_id": "bench", "created_at": now} for i in ids])
        extra = {ITEM_ROWS: pa.array([1] * block, pa.int32()), GROUP: pa.nulls(block, pa.int32()),
                 GROUPS: pa.nulls(block, pa.int32()), BYTES_READ: pa.array([1000] * block, pa.int64()),
                 READ_RETRIES: pa.array([0] * block, pa.int32()),
                 SHARD: pa.array([shard_id(b // 40, "0badc0de")] * block, pa.string())}
        for name, column in extra.items():
            table = table.append_column(name, column)
        blocks.append(table)
    try:
        start = time.perf_counter()
        files = sum(len(commit_rows(t, spec)[0]) for t in blocks)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": rows, "block_rows": block, "files": files, "wall_s": wall, "rows_per_s": rows / wall}


def run(c) -> dict:
    """The scale runs of a PipelineBenchConfig with `scale` (see the module doc); writes c.out and its section."""
    tmp = None if c.workdir else tempfile.mkdtemp(prefix="lavi-scale-")
    work = Path(c.workdir or tmp)
    results = []
    try:
        for n in sorted(c.scale):
            root = work / f"corpus-{n}"
            shutil.rmtree(root, ignore_errors=True)  # a fresh corpus: its manifest is appended to
            t = time.perf_counter()
            manifest = scale_corpus(root, n, seed=c.seed)
            made = time.perf_counter() - t
            out = work / f"labels-{n}"
            config = {"inputs": [str(manifest)], "out": str(out), "model": c.model, "batch_size": c.scale_batch,
                      "decode_batch_size": c.scale_batch, "overwrite": True, "rows_per_file": 5000}
            child = run_child(config, out, work, fixed=True)
            this = child["summary"]["this_run"]
            results.append({"run": f"{n:,} items", "items": n, "corpus_write_s": made, "wall_s": child["process_wall_s"],
                            "rows": this["rows"], "rows_per_s": this["rows"] / child["process_wall_s"],
                            "steady_rows_per_s": child["steady_rows_per_s"], "first_commit_s": child["first_commit_s"],
                            "driver_peak_rss_mb": mb(child["peak_rss_bytes"]), "files": this["files"],
                            "census": child.get("census")})
        if c.resume_left:
            n = max(c.scale)
            manifest = scale_corpus(work / f"corpus-{n}", c.resume_left, start=n, seed=c.seed)
            out = work / f"labels-{n}"
            config = {"inputs": [str(manifest)], "out": str(out), "model": c.model, "batch_size": c.scale_batch,
                      "decode_batch_size": c.scale_batch, "rows_per_file": 5000}
            child = run_child(config, out, work, fixed=True)
            this = child["summary"]["this_run"]
            results.append({"run": f"resume: {n:,} done + {c.resume_left:,} new", "items": n + c.resume_left,
                            "wall_s": child["process_wall_s"], "rows": this["rows"],
                            "rows_per_s": this["rows"] / child["process_wall_s"],
                            "first_commit_s": child["first_commit_s"],
                            "driver_peak_rss_mb": mb(child["peak_rss_bytes"]), "files": this["files"],
                            "items_skipped": this["items_skipped"]})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    doc = {"scale": True, "results": results, "commit_alone": commit_alone(), "targets": targets(results),
           "device": device_description("cpu"), "versions": versions(), "command": command_line(),
           "config": asdict(c)}
    doc["targets"] += [_target("commit path alone", doc["commit_alone"]["rows_per_s"], ">=", 20_000, "rows/s")]
    write_json(doc, c.out)
    if c.markdown:
        write_section(c.markdown, "pipeline-scale", markdown(doc))
    return doc


def _target(what: str, value: float | None, op: str, want: float, unit: str) -> dict:
    met = value is not None and (value >= want if op == ">=" else value <= want)
    gap = None if value is None or met else (f"{want / value:.2f}x short" if op == ">=" else f"{value / want:.2f}x over")
    return {"target": f"{what} {op} {want:g} {unit}", "value": value, "met": "yes" if met else "no", "gap": gap}


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets against these runs' figures (the largest and the smallest size, and the resume)."""
    runs = [r for r in results if not r["run"].startswith("resume")]
    out = [_target(f"images/s at {r['items']:,}", r["rows_per_s"], ">=", 1000, "images/s") for r in runs]
    big, small = max(runs, key=lambda r: r["items"]), min(runs, key=lambda r: r["items"])
    if big is not small and small["driver_peak_rss_mb"] and big["driver_peak_rss_mb"]:
        out.append(_target(f"driver peak RSS at {big['items']:,} / at {small['items']:,}",
                           big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], "<=", 1.10, "x"))
    out.append(_target(f"driver peak RSS at {big['items']:,}", big["driver_peak_rss_mb"], "<=", 1024, "MB"))
    out.append(_target(f"first committed row at {big['items']:,}", big["first_commit_s"], "<=", 30, "s"))
    out += [_target(r["run"], r["wall_s"], "<=", 30, "s wall") for r in results if r["run"].startswith("resume")]
    return out


def markdown(doc: dict) -> str:
    c, ca = doc["config"], doc["commit_alone"]
    return "\n".join([
        *section_head(f"bench pipeline --scale: {', '.join(f'{n:,}' for n in sorted(c['scale']))} images on "
                      f"{doc['device']}", doc),
        f"`lavi-label run`'s pipeline in a process of its own with a labeler of the benchmark's own (no model: a fixed "
        f"text, the real labeler's bookkeeping), {c['scale_batch']} items per split task and labeler block, images of "
        f"a few KB listed from a JSONL manifest. rows/s is end to end (process start to exit); steady is between the "
        f"first and last part file; driver peak RSS is the driver process's own (VmHWM).", "",
        table(doc["results"], [("run", "run"), ("wall_s", "wall s"), ("rows", "rows"), ("rows_per_s", "rows/s"),
                               ("steady_rows_per_s", "steady rows/s"), ("first_commit_s", "first commit s"),
                               ("driver_peak_rss_mb", "driver peak RSS MB"), ("files", "part files")]), "",
        f"Commit path alone (workers.commit.commit_rows, {ca['rows']:,} rows in blocks of {ca['block_rows']}, one "
        f"process): {ca['rows_per_s']:,.0f} rows/s ({ca['files']} files).", "",
        table(doc["targets"], [("target", "target"), ("value", "value"), ("met", "met"), ("gap", "gap")]),
        *rss_growth(doc["results"]),
    ]) + "\n"


def rss_growth(results: list[dict]) -> list[str]:
    """Where the driver's memory grew between the smallest and the largest run, as each run's census at its end saw it
    (bench.child.census): the Python heap (pymalloc blocks, counted at 64 B each, their usual size here), Arrow's
    pool, the live object types that grew most, and the rest (native: Ray's core worker, the allocator's arenas)."""
    runs = [r for r in results if not r["run"].startswith("resume") and r.get("census")]
    if len(runs) < 2:
        return []
    small, big = min(runs, key=lambda r: r["items"]), max(runs, key=lambda r: r["items"])
    a, b = small["census"], big["census"]
    peak = big["driver_peak_rss_mb"] - small["driver_peak_rss_mb"]
    python = (b["python_blocks"] - a["python_blocks"]) * 64 / 2**20
    arrow = (b["arrow_bytes"] - a["arrow_bytes"]) / 2**20
    grew = sorted(((n - a["objects"].get(t, 0), t) for t, n in b["objects"].items()), reverse=True)[:4]
    objects = ", ".join(f"{t} {d:+,}" for d, t in grew if d > 0) or "none of the commonest types"
    return ["", f"Driver memory from {small['items']:,} to {big['items']:,} items: peak RSS {peak:+.1f} MB; at each run's "
            f"end, the Python heap {python:+.1f} MB, Arrow's pool {arrow:+.1f} MB, the rest (native: Ray's core worker, "
            f"the allocator) {peak - python - arrow:+.1f} MB; live objects that grew most: {objects}."]
