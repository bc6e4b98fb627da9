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

import logging
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import scale
from bench.child import mb, run_child
from bench.report import (command_line, device_description, section_head, table, versions, write_json,
                          write_section)
from schemas.rows import ERROR

log = logging.getLogger(__name__)
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
    from lavi.bundled import DEFAULT_MODEL

    if model:
        return model, "given"
    if (Path(DEFAULT_MODEL) / "config.json").exists():
        return DEFAULT_MODEL, "bundled"
    import torch

    from bench.configs import random_model
    from lavi.core import checkpoint
    from lavi.tiny_models import save_word_tokenizer, tiny_shapes_config
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
            if row["status"] != ERROR:
                clips.append((np.ascontiguousarray(row["frames"]), row["media_type"]))
    return clips


def plain_loop(model_dir: str, clips: list[tuple], batch_size: int, device: str, max_new_tokens: int,
               threads: int | None = None) -> dict:
    """Engine.generate over decoded clips, batch by batch, as a script would: the model-only baseline, on torch's
    default threads or on `threads` (then restored)."""
    import torch

    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _plain(model_dir, clips, batch_size, device, max_new_tokens)
    finally:
        torch.set_num_threads(saved)


def labeler_threads(weights: int) -> int:
    """The torch threads the run's one CPU labeler computes on here (workers.cpu_share.cpu_threads at this machine's
    CPUs and the run's default CPUs per labeler)."""
    from pipeline.config import RunConfig
    from workers.cpu_share import cpu_threads, machine_cpus

    return cpu_threads(machine_cpus(), 1, RunConfig.__dataclass_fields__["cpus_per_worker"].default, weights)


def _plain(model_dir: str, clips: list[tuple], batch_size: int, device: str, max_new_tokens: int) -> dict:
    import torch

    from lavi.serving.cpu_pack import weight_count
    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig

    engine = Engine.load(model_dir, device=device, max_batch=batch_size)
    weights = weight_count(engine.model)
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
    return {"wall_s": time.perf_counter() - start, "rows": len(clips), "generated_tokens": tokens,
            "weights": weights, "threads": torch.get_num_threads()}


def run(c: PipelineBenchConfig) -> dict:
    """Write the corpus, run the pipeline and the plain loop (or, with --scale, the scale runs), write c.out and
    c.markdown's section."""
    if c.scale:
        return scale.run(c)
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
        threads = None if gpus else labeler_threads(plain["weights"])
        alone = (plain_loop(model_dir, clips, c.batch_size, c.device, c.max_new_tokens, threads)
                 if threads is not None and threads < plain["threads"] else None)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary, wall = child["summary"], child["process_wall_s"]
    rows = summary["this_run"]["rows"]
    plain_rate = plain["rows"] / plain["wall_s"]
    pipeline_row = {"mode": "pipeline", "wall_s": wall, "rows": rows, "rows_per_s": rows / wall,
                    "steady_rows_per_s": child["steady_rows_per_s"], "first_commit_s": child["first_commit_s"],
                    "driver_peak_rss_mb": mb(child["peak_rss_bytes"]),
                    "generated_tokens": summary["this_run"]["generated_tokens"], "gpu_busy_fraction": gpu_busy,
                    "status": summary.get("status"), "ray_start_s": summary["this_run"].get("ray_start_s")}
    plains = [(f"plain, {p['threads']} torch thread{'s' * (p['threads'] > 1)}", p) for p in (plain, alone) if p]
    doc = {
        "results": [pipeline_row] + [{"mode": mode, "wall_s": p["wall_s"], "rows": p["rows"],
                                      "rows_per_s": p["rows"] / p["wall_s"],
                                      "steady_rows_per_s": p["rows"] / p["wall_s"],
                                      "generated_tokens": p["generated_tokens"], "threads": p["threads"]}
                                     for mode, p in plains],
        "labeler_threads": threads,
        "steady_ratio_labeler_threads": (child["steady_rows_per_s"] * alone["wall_s"] / alone["rows"]
                                         if alone and child["steady_rows_per_s"] else None),
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


def _threads_cause(doc: dict) -> str:
    """The steady shortfall's cause when the labeler computes on fewer threads than the plain loop: what the plain
    loop does on the labeler's threads, and the pipeline's steady rate against that."""
    alone, n = doc.get("steady_ratio_labeler_threads"), doc.get("labeler_threads")
    if alone is None:
        return "."
    rate = doc["results"][-1]["rows_per_s"]
    return (f", and its labeler computes on {n} torch thread{'s' * (n > 1)} (workers.cpu_share.cpu_threads: a small "
            "model's microsecond ops beside the pipeline's other processes wait on OpenMP's barriers with more), where "
            f"the plain loop runs at {rate:.1f} rows/s: the pipeline's steady rate is {alone:.3f} of that.")


def markdown(doc: dict) -> str:
    if doc.get("scale"):
        return scale.markdown(doc)
    c = doc["config"]
    ratio, steady = doc["throughput_ratio"], doc["steady_ratio"]
    lines = [
        *section_head(f"bench pipeline: {c['images']} images + {c['videos']} videos on {doc['device']}", doc),
        f"Model: {doc['model_kind']}; batch {c['batch_size']}, {c['max_new_tokens']} max new tokens. "
        "pipeline = `lavi-label run` end to end in a process of its own (Ray start, listing, decode, labeler, "
        "commits, summary); steady = rows committed between its first and last part file over that time; plain = "
        "Engine.generate over the same clips, decoded beforehand (not timed), on torch's default threads and, on "
        "CPU, on the threads the pipeline's labeler computes on (workers.cpu_share.cpu_threads).", "",
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
                  f"{run['wall_s']:.1f} s went before its first part file (Ray's start: "
                  f"{run.get('ray_start_s') or 0:.1f} s; the worker and labeler processes, the model's load, the first "
                  "blocks), which the plain loop does not pay; from there "
                  f"it ran at {steady:.3f} of the plain loop"
                  + ("." if steady >= TARGET else f", itself {TARGET / steady:.2f}x short: the plain loop's clips "
                     "were decoded beforehand and untimed, the pipeline decodes them on the same cores"
                     + _threads_cause(doc))]
    return "\n".join(lines) + "\n"
