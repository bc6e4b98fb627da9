"""`lavi-label bench pipeline`: the real `lavi-label run` (pipeline.driver.run) on a generated shapes-v1 corpus vs
a plain model loop over the same decoded items, same model, batch size and device; and with --scale, the pipeline
without a model at corpus sizes where its own costs show (bench.scale).

    pipeline   pipeline.driver.run(RunConfig(...)) in a process of its own (bench.child): Ray start, listing, fetch +
               decode tasks, the labeler actor, commits, the summary, end to end. Its wall time, its rows/s end to
               end and between its first and last commit (steady), the time to its first committed row, and the
               driver's peak resident memory
    plain      Engine.generate over the already-decoded clips in batches of batch_size (decode not timed), in this
               process with torch's default threads (every core)
    ratio      pipeline / plain rows/s, end to end and steady (target on CPU: >= 0.8 at 2,000 images; on GPU: >= 0.9)

On CUDA the GPU busy fraction during the pipeline run is sampled with nvidia-smi when it is present.
Imports ray (through pipeline/) only when run, never at import time.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.report import (command_line, device_description, section_head, table, versions, write_json,
                          write_section)

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.8  # pipeline / plain rows/s on CPU at 2,000 images (#33)


@dataclass(frozen=True)
class PipelineBenchConfig:
    images: int = 200
    videos: int = 0
    batch_size: int = 32
    device: str = "cpu"
    model: str | None = None  # None: the bundled model, or a random tiny-shapes one if it is not built yet
    max_new_tokens: int = 48
    workdir: str | None = None  # corpus, labels and any random model go here (None: a temp dir, removed)
    seed: int = 0
    out: str = "bench-pipeline.json"
    markdown: str | None = "BENCHMARKS.md"
    scale: tuple[int, ...] = ()  # scale mode (bench.scale): corpus sizes, labelled by a labeler without a model
    scale_batch: int = 256  # scale mode: items per split task and clips per labeler block
    resume_left: int = 1000  # scale mode: items added to the largest corpus for the resume measurement

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))
        if self.scale:
            if min(self.scale) < 1 or self.scale_batch < 1 or self.resume_left < 0:
                raise ValueError("--scale sizes, --scale-batch must be >= 1 and --resume-left >= 0")
            return
        if self.images < 0 or self.videos < 0 or self.images + self.videos < 1:
            raise ValueError("--images/--videos: give at least one item")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be >= 1")


def resolve_model(model: str | None, workdir: Path, seed: int) -> tuple[str, str]:
    """(checkpoint dir, what it is): the given one, the bundled one, or a random tiny-shapes LaVi written
    to workdir with the shapes-v1 word tokenizer (same shapes and cost as the bundled model)."""
    from lavi.engine import DEFAULT_MODEL

    if model:
        return model, "given"
    if (Path(DEFAULT_MODEL) / "config.json").exists():
        return DEFAULT_MODEL, "bundled"
    import torch

    from bench.configs import random_model
    from lavi import checkpoint
    from lavi.tiny import save_word_tokenizer, tiny_shapes_config
    from shapes.spec import vocabulary

    path = workdir / "random-tiny-shapes"
    tok = save_word_tokenizer(vocabulary(), path)
    checkpoint.save(random_model(tiny_shapes_config(tok.get_vocab_size()), "cpu", torch.float32, seed=seed), path)
    return str(path), "random tiny-shapes (the bundled model is not built)"


class GpuBusy:
    """Samples nvidia-smi's utilization.gpu every 200 ms in the background; mean() after stop()."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> "GpuBusy":
        if shutil.which("nvidia-smi") is None:
            return self
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "200"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]) / 100)
            except ValueError:
                continue

    def stop(self) -> float | None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)
        return sum(self.samples) / len(self.samples) if self.samples else None


def decoded_clips(manifest: str, image_size: int, frames: int) -> list[tuple]:
    """The corpus's items decoded as the pipeline decodes them: [(uint8 (F, S, S, 3), media type)]."""
    import numpy as np

    from pipeline.sources import PromptSpec, iter_items
    from workers.decode import DecodeSettings, fetch_and_decode

    settings = DecodeSettings(image_size=image_size, frames_per_clip=frames, isolate=False)
    clips = []
    for item in iter_items([manifest], PromptSpec()):
        for row in fetch_and_decode(item, settings):
            if row["status"] != "error":
                clips.append((np.ascontiguousarray(row["frames"]), row["media_type"]))
    return clips


def plain_loop(model_dir: str, clips: list[tuple], batch_size: int, device: str, max_new_tokens: int) -> dict:
    """Engine.generate over decoded clips, batch by batch, as a script would: the model-only baseline."""
    import torch

    from lavi.engine import Engine
    from lavi.generate import GenerationConfig

    engine = Engine.load(model_dir, device=device, max_batch=batch_size)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warm = clips[:batch_size]  # one warm-up batch: the pipeline's actor also loads before its first batch
    engine.generate([c for c, _ in warm], [(i, engine.default_prompt(m)) for i, (_, m) in enumerate(warm)], gen)
    sync()
    start = time.perf_counter()
    tokens = 0
    for s in range(0, len(clips), batch_size):
        chunk = clips[s:s + batch_size]
        out = engine.generate([c for c, _ in chunk], [(i, engine.default_prompt(m)) for i, (_, m) in enumerate(chunk)],
                              gen)
        tokens += sum(g.num_generated_tokens for g in out)
    sync()
    return {"wall_s": time.perf_counter() - start, "rows": len(clips), "generated_tokens": tokens}


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


def run(c: PipelineBenchConfig) -> dict:
    """Write the corpus, run the pipeline and the plain loop (or, with --scale, the scale runs), write c.out and
    c.markdown's section."""
    if c.scale:
        from bench.scale import run as run_scale

        return run_scale(c)
    from pipeline.models import model_info
    from shapes.corpus import write_corpus

    tmp = None if c.workdir else tempfile.mkdtemp(prefix="lavi-bench-")
    work = Path(c.workdir or tmp)
    try:
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        manifest = write_corpus(str(work / "corpus"), c.images, c.videos, c.seed)
        corpus_s = time.perf_counter() - t
        model_dir, model_kind = resolve_model(c.model, work, c.seed)
        info = model_info(model_dir)
        gpus = 1.0 if c.device.startswith("cuda") else 0.0
        config = {"inputs": [manifest], "out": str(work / "labels"), "model": model_dir, "batch_size": c.batch_size,
                  "gpus_per_worker": gpus, "max_new_tokens": c.max_new_tokens, "overwrite": True, "seed": c.seed}
        busy = GpuBusy().start() if gpus else None
        child = run_child(config, work / "labels", work)
        gpu_busy = busy.stop() if busy else None
        clips = decoded_clips(manifest, info["image_size"], info["default_frames"])
        plain = plain_loop(model_dir, clips, c.batch_size, c.device, c.max_new_tokens)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary, wall = child["summary"], child["process_wall_s"]
    rows = summary["this_run"]["rows"]
    plain_rate = plain["rows"] / plain["wall_s"]
    pipeline_row = {"mode": "pipeline", "wall_s": wall, "rows": rows, "rows_per_s": rows / wall,
                    "steady_rows_per_s": child["steady_rows_per_s"], "first_commit_s": child["first_commit_s"],
                    "driver_peak_rss_mb": _mb(child["peak_rss_bytes"]),
                    "generated_tokens": summary["this_run"]["generated_tokens"], "gpu_busy_fraction": gpu_busy,
                    "status": summary.get("status")}
    doc = {
        "results": [pipeline_row, {"mode": "plain", "wall_s": plain["wall_s"], "rows": plain["rows"],
                                   "rows_per_s": plain_rate, "steady_rows_per_s": plain_rate,
                                   "generated_tokens": plain["generated_tokens"]}],
        "throughput_ratio": (rows / wall) / plain_rate if plain["rows"] == rows else None,
        "steady_ratio": (child["steady_rows_per_s"] / plain_rate) if child["steady_rows_per_s"] else None,
        "model": model_dir, "model_kind": model_kind, "corpus_write_s": corpus_s,
        "device": device_description(c.device), "versions": versions(), "command": command_line(),
        "config": asdict(c),
    }
    write_json(doc, c.out)
    if c.markdown:
        kind = "images" if not c.videos else "videos" if not c.images else "mixed"
        write_section(c.markdown, f"pipeline-{c.device.split(':')[0]}-{kind}", markdown(doc))
    return doc


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def markdown(doc: dict) -> str:
    if doc.get("scale"):
        from bench.scale import markdown as scale_markdown

        return scale_markdown(doc)
    c = doc["config"]
    ratio, steady = doc["throughput_ratio"], doc["steady_ratio"]
    lines = [
        *section_head(f"bench pipeline: {c['images']} images + {c['videos']} videos on {doc['device']}", doc),
        f"Model: {doc['model_kind']}; batch {c['batch_size']}, {c['max_new_tokens']} max new tokens. "
        "pipeline = `lavi-label run` end to end in a process of its own (Ray start, listing, decode, labeler, "
        "commits, summary); steady = rows committed between its first and last part file over that time; plain = "
        "Engine.generate over the same clips, decoded beforehand (not timed), torch's default threads.", "",
        table(doc["results"], [("mode", "mode"), ("wall_s", "wall s"), ("rows", "rows"), ("rows_per_s", "rows/s"),
                               ("steady_rows_per_s", "steady rows/s"), ("first_commit_s", "first commit s"),
                               ("driver_peak_rss_mb", "driver peak RSS MB"), ("generated_tokens", "tokens"),
                               ("gpu_busy_fraction", "GPU busy")]), "",
        (f"pipeline / plain rows/s: {ratio:.3f} end to end, {steady:.3f} steady (target >= {TARGET})"
         if ratio is not None and steady is not None else
         "pipeline and plain loop labelled different row counts: see the JSON"),
    ]
    if ratio is not None and steady is not None and ratio < TARGET:
        run = doc["results"][0]
        lines += ["", f"Missed by {TARGET / ratio:.2f}x end to end: {run['first_commit_s']:.1f} s of the pipeline's "
                  f"{run['wall_s']:.1f} s went before its first part file (Ray's start, the worker and labeler "
                  "processes, the model's load, the first blocks), which the plain loop does not pay; from there "
                  f"it ran at {steady:.3f} of the plain loop"
                  + ("." if steady >= TARGET else f", itself {TARGET / steady:.2f}x short: the plain loop's clips "
                     "were decoded beforehand and untimed, the pipeline decodes them on the same cores.")]
    return "\n".join(lines) + "\n"
