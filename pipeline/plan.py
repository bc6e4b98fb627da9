"""`lavi-label plan INPUT...`: what a run would cost, before it starts.

1. count: the INPUTs are listed (streamed, as a run lists them): items by media type and the rows they ask for
   (prompts per item), and a seeded sample of `sample` items is kept on the way (pipeline.sources.sample);
2. measure: the sample is labelled with the run's own settings on this cluster (the same pipeline, into a
   scratch output that is deleted after): clips per video, generated tokens per row, error rate, and the rate;
3. forecast: the counts times the sample's ratios: clips, rows, generated tokens, wall time on this cluster's
   labelers (start-up, then the steady rate), and GPU-hours (wall time x workers x GPUs per worker).

The steady rate comes from the sample's rows' `created_at` (rows per second between the first rows and the
last, so the start-up - Ray, the model load - is counted once, not per item); a sample too small for two times
falls back to its whole wall time. A forecast is as good as its sample: a bigger `--sample` costs more and
tells more.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.output import Output
from pipeline.sources import PromptSpec, item_for_entry, iter_entries, sample_key
from schemas.manifest import media_type_from_name
from schemas.rows import ERROR, IMAGE, VIDEO
from workers.storage import read_parquet_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
    items: Counter  # media type (by name or manifest) -> items
    prompts: Counter  # media type -> prompts asked of its items (rows before clips)


def count(config: RunConfig, n: int, seed: int) -> tuple[Corpus, list[dict]]:
    """Stream the INPUTs once: their counts, and a seeded sample of n entries, split between images and videos
    as the corpus is (at least one of each kind it has, so a video's clips are measured even when videos are
    few); memory for n entries of each kind."""
    corpus = Corpus(Counter(), Counter())
    spec = PromptSpec(config.task, config.prompt, config.questions, config.constraint)
    heaps: dict[str, list] = {}
    for i, entry in enumerate(iter_entries(config.inputs, config.storage)):
        kind = entry.get("media_type") or media_type_from_name(entry["uri"])
        corpus.items[kind] += 1
        corpus.prompts[kind] += len(item_for_entry(entry, spec)["prompts"])
        heap = heaps.setdefault(kind, [])
        key = (-sample_key(seed, entry["uri"]), i, entry)
        if len(heap) < n:
            heapq.heappush(heap, key)
        elif key > heap[0]:
            heapq.heapreplace(heap, key)
    total = sum(corpus.items.values())
    picked: list[dict] = []
    for kind, heap in sorted(heaps.items()):
        share = max(1, round(n * corpus.items[kind] / total))
        picked += [e for _, _, e in sorted(heap, reverse=True)[:share]]
    return corpus, picked


def measure(output: Output) -> dict[str, Any]:
    """Ratios and rates of a labelled sample, from its rows."""
    clips: dict[str, set] = {}
    rows = tokens = errors = 0
    kinds: Counter = Counter()
    times: list[float] = []
    for path in output.part_paths():
        with output.fs.open(path, "rb") as f:
            table = read_parquet_file(f, ["item_id", "media_type", "clip_index", "status", "num_generated_tokens",
                                          "created_at"])
        for r in table.to_pylist():
            rows += 1
            kinds[r["media_type"]] += 1
            tokens += r["num_generated_tokens"] or 0
            errors += r["status"] == ERROR
            if r["media_type"] == VIDEO:
                clips.setdefault(r["item_id"], set()).add(r["clip_index"])
            times.append(r["created_at"].timestamp())
    distinct = sorted(set(times))
    steady = None
    if len(distinct) >= 2:
        first = sum(1 for t in times if t == distinct[0])  # the first rows mark the end of the start-up
        steady = (rows - first) / (distinct[-1] - distinct[0])
    return {"rows": rows, "generated_tokens": tokens, "error_rows": errors,
            "clips_per_video": (sum(map(len, clips.values())) / len(clips)) if clips else 1.0,
            "tokens_per_row": tokens / rows if rows else 0.0, "steady_rows_per_s": steady, "rows_by_media": kinds}


def plan(config: RunConfig, n: int = 64, seed: int = 0) -> dict[str, Any]:
    """Count the corpus, label a sample of n items with `config`'s settings (its `out` is ignored), and return the
    forecast (see the module doc)."""
    from pipeline.driver import run

    start = time.monotonic()
    corpus, picked = count(config, n, seed)
    if not picked:
        raise ValueError("the INPUTs hold no images or videos to plan for")
    scratch = Path(tempfile.mkdtemp(prefix="lavi-plan-"))
    try:
        manifest = scratch / "sample.jsonl"
        keep = ("uri", "media_type", "prompt", "questions")
        manifest.write_text("".join(json.dumps({k: e[k] for k in keep if e.get(k) is not None}) + "\n"
                                    for e in picked))
        sample_config = dataclasses.replace(config, inputs=(str(manifest),), out=str(scratch / "out"),
                                            overwrite=False, job_id="plan")
        summary = run(sample_config)
        measured = measure(Output(str(scratch / "out")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall = summary["this_run"]["wall_s"]
    items = sum(corpus.items.values())
    video_prompts = corpus.prompts.get(VIDEO, 0)
    rows = round(sum(corpus.prompts.values()) - video_prompts + video_prompts * measured["clips_per_video"])
    steady = measured["steady_rows_per_s"]
    if steady:
        startup = max(0.0, wall - measured["rows"] / steady)
        forecast_s = startup + rows / steady
    else:  # too small a sample for a steady rate: its whole wall time, start-up and all, per row
        startup, forecast_s = None, wall * rows / max(measured["rows"], 1)
    gpus = config.workers * config.gpus_per_worker
    return {
        "corpus": {"items": items, "images": corpus.items.get(IMAGE, 0), "videos": corpus.items.get(VIDEO, 0),
                   "other": items - corpus.items.get(IMAGE, 0) - corpus.items.get(VIDEO, 0),
                   "prompts": sum(corpus.prompts.values())},
        "sample": {"items": len(picked), "rows": measured["rows"], "wall_s": round(wall, 2),
                   "error_rows": measured["error_rows"], "clips_per_video": round(measured["clips_per_video"], 3),
                   "tokens_per_row": round(measured["tokens_per_row"], 2),
                   "steady_rows_per_s": round(steady, 3) if steady else None,
                   "startup_s": round(startup, 2) if startup is not None else None},
        "forecast": {"rows": rows,
                     "clips": round(items - corpus.items.get(VIDEO, 0) * (1 - measured["clips_per_video"])),
                     "generated_tokens": round(rows * measured["tokens_per_row"]),
                     "error_rows": round(rows * measured["error_rows"] / max(measured["rows"], 1)),
                     "wall_s": round(forecast_s, 1), "gpu_hours": round(forecast_s * gpus / 3600, 3)},
        "cluster": {"workers": config.workers, "gpus_per_worker": config.gpus_per_worker,
                    "device": config.device, "batch_size": config.batch_size},
        "plan_wall_s": round(time.monotonic() - start, 2),
    }


def format_plan(p: dict[str, Any]) -> str:
    c, s, f, k = p["corpus"], p["sample"], p["forecast"], p["cluster"]
    rate = (f"{s['steady_rows_per_s']:.2f} rows/s after {s['startup_s']:.1f} s of start-up"
            if s["steady_rows_per_s"] else f"{s['rows'] / max(s['wall_s'], 1e-9):.2f} rows/s over its whole run")
    hours = f", {f['gpu_hours']:.2f} GPU-hours" if k["gpus_per_worker"] else " (CPU labelers: no GPU-hours)"
    return "\n".join([
        f"corpus: {c['items']} items ({c['images']} images, {c['videos']} videos"
        + (f", {c['other']} of unknown type" if c["other"] else "") + f"), {c['prompts']} prompts",
        f"sample: {s['items']} items -> {s['rows']} rows in {s['wall_s']:.1f} s ({rate}); {s['clips_per_video']:g} "
        f"clips per video, {s['tokens_per_row']:g} generated tokens per row, {s['error_rows']} error rows",
        f"forecast on this cluster ({k['workers']} {k['device']} labelers x {k['gpus_per_worker']:g} GPU): "
        f"{f['clips']} clips, {f['rows']} rows, {f['generated_tokens']} generated tokens, ~{f['error_rows']} error "
        f"rows, {_duration(f['wall_s'])}{hours}",
    ])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
