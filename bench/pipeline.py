"""`lavi-label bench pipeline`: the real `lavi-label run` (pipeline.graph.run) on a generated shapes-v1
corpus vs a plain model loop over the same decoded items, same model, batch size and device.

    pipeline   wall time of pipeline.graph.run(RunConfig(...)): Ray start, listing, fetch + decode
               tasks, the labeler actor, the Parquet sink and the summary, end to end
    plain      Engine.generate over the already-decoded clips in batches of batch_size (decode not timed)
    ratio      pipeline / plain (target on CPU: <= 1.3 at 2,000 images; on GPU: plain / pipeline >= 0.9)

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

from bench.report import command_line, device_description, table, versions, write_json, write_section

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
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


def run(c: PipelineBenchConfig) -> dict:
    """Write the corpus, run the pipeline and the plain loop, write c.out and c.markdown's section."""
    from pipeline.config import RunConfig
    from pipeline.graph import model_info
    from pipeline.graph import run as run_pipeline
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
        config = RunConfig(inputs=(manifest,), out=str(work / "labels"), model=model_dir, batch_size=c.batch_size,
                           gpus_per_worker=gpus, max_new_tokens=c.max_new_tokens, overwrite=True,
                           seed=c.seed)
        busy = GpuBusy().start() if gpus else None
        t = time.perf_counter()
        summary = run_pipeline(config)
        pipeline_s = time.perf_counter() - t
        gpu_busy = busy.stop() if busy else None
        clips = decoded_clips(manifest, info["image_size"], info["default_frames"])
        plain = plain_loop(model_dir, clips, c.batch_size, c.device, c.max_new_tokens)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = summary["this_run"]["rows"]
    doc = {
        "results": [
            {"mode": "pipeline", "wall_s": pipeline_s, "rows": rows, "rows_per_s": rows / pipeline_s,
             "generated_tokens": summary["this_run"]["generated_tokens"], "gpu_busy_fraction": gpu_busy,
             "status": summary.get("status")},
            {"mode": "plain", "wall_s": plain["wall_s"], "rows": plain["rows"],
             "rows_per_s": plain["rows"] / plain["wall_s"], "generated_tokens": plain["generated_tokens"]},
        ],
        "wall_time_ratio": pipeline_s / plain["wall_s"] if plain["rows"] == rows else None,
        "throughput_ratio": (rows / pipeline_s) / (plain["rows"] / plain["wall_s"]),
        "model": model_dir, "model_kind": model_kind, "corpus_write_s": corpus_s,
        "device": device_description(c.device), "versions": versions(), "command": command_line(),
        "config": asdict(c),
    }
    write_json(doc, c.out)
    if c.markdown:
        write_section(c.markdown, f"pipeline-{c.device.split(':')[0]}", markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    c = doc["config"]
    ratio = doc["wall_time_ratio"]
    return "\n".join([
        f"## bench pipeline: {c['images']} images + {c['videos']} videos on {doc['device']}", "",
        f"`{doc['command']}`", "",
        "versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
        f"Model: {doc['model_kind']}; batch {c['batch_size']}, {c['max_new_tokens']} max new tokens. "
        "pipeline = `lavi-label run` end to end (Ray start, decode, labeler, Parquet, summary); "
        "plain = Engine.generate over the same clips, decoded beforehand (not timed).", "",
        table(doc["results"], [("mode", "mode"), ("wall_s", "wall s"), ("rows", "rows"), ("rows_per_s", "rows/s"),
                               ("generated_tokens", "tokens"), ("gpu_busy_fraction", "GPU busy")]), "",
        f"pipeline / plain wall time: {ratio:.3f}" if ratio is not None else
        "pipeline and plain loop labeled different row counts: see the JSON",
    ]) + "\n"
