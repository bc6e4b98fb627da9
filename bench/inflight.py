"""In-flight batching against static batches on a mixed workload, measured side by side in one run.

A labeling job mixes long captions and short answers; a static batch waits for its longest row, an in-flight pool
hands a finished row's cache row to the next request. The workload: shapes-v1 images (rendered, seeded), a caption
and `questions` short VQA answers each, through a trained checkpoint (it stops at EOS as real labels do: a random
model never would), batches of `batch` rows; the two modes take turns `repeats` times after a warm-up each, and the
median pass counts. The texts of both modes are compared too (they must be the same).
"""
from __future__ import annotations

import statistics
import time

import numpy as np


def mixed_requests(n_images: int, questions: int,
                   seed: int = 0) -> tuple[list[np.ndarray], list[tuple[int, str | None]]]:
    """(clips, (clip, prompt) requests): each image's caption (prompt None: the model's default) and its first
    `questions` questions."""
    from shapes.render import sample_image

    rng = np.random.default_rng([seed, 7])
    clips, requests = [], []
    for i in range(n_images):
        item = sample_image(rng)
        clips.append(item.pixels[None])
        requests.append((i, None))
        requests += [(i, q) for q, _ in item.qa[:questions]]
    return clips, requests


def measure_inflight(path: str, device: str = "cpu", n_images: int = 48, questions: int = 4, batch: int = 32,
                     max_new_tokens: int = 48, repeats: int = 3, seed: int = 0) -> dict:
    """Rows/s of `path` (a LaVi checkpoint directory) with in-flight batching and with static batches."""
    import torch

    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig

    engine = Engine.load(path, device=device, max_batch=batch)
    clips, requests = mixed_requests(n_images, questions, seed)
    size = engine.image_size
    if clips[0].shape[1] != size:
        from PIL import Image
        clips = [np.asarray(Image.fromarray(c[0]).resize((size, size), Image.BILINEAR))[None] for c in clips]
    asks = [(c, p if p is not None else engine.default_prompt("image")) for c, p in requests]
    gen = GenerationConfig(max_new_tokens=max_new_tokens)

    def once(inflight: bool) -> tuple[float, list]:
        engine.inflight = inflight
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.generate(clips, asks, gen)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    walls: dict[bool, list[float]] = {True: [], False: []}
    texts = {mode: [c.text for c in once(mode)[1]] for mode in (True, False)}  # warm-up, and the texts compared
    for _ in range(repeats):
        for mode in (True, False):
            walls[mode].append(once(mode)[0])
    lengths = [c.num_generated_tokens for c in engine.generate(clips, asks, gen)]
    rows = len(asks)
    out = {"model": engine.name, "path": path, "device": device, "images": n_images, "rows": rows,
           "questions_per_image": questions, "batch_size": batch, "max_new_tokens": max_new_tokens, "repeats": repeats,
           "generated_tokens": {"mean": float(np.mean(lengths)), "min": int(min(lengths)), "max": int(max(lengths))},
           "same_texts": texts[True] == texts[False]}
    for mode, name in ((True, "inflight"), (False, "static")):
        wall = statistics.median(walls[mode])
        out[name] = {"wall_s": wall, "rows_per_s": rows / wall}
    out["inflight_over_static"] = out["inflight"]["rows_per_s"] / out["static"]["rows_per_s"]
    return out


def markdown(m: dict) -> str:
    g = m["generated_tokens"]
    return "\n".join([
        "", f"In-flight batching on a mixed workload ({m['model']}, {m['device']}): {m['images']} shapes-v1 images, a "
        f"caption and {m['questions_per_image']} questions each ({m['rows']} rows, {g['min']}-{g['max']} generated "
        f"tokens, mean {g['mean']:.1f}), batch {m['batch_size']}, median of {m['repeats']} passes each, taking turns; "
        f"same texts in both modes: {'yes' if m['same_texts'] else 'NO'}.", "",
        "| batching | rows/s | wall s |", "|---|---|---|",
        f"| in-flight | {m['inflight']['rows_per_s']:.2f} | {m['inflight']['wall_s']:.3f} |",
        f"| static | {m['static']['rows_per_s']:.2f} | {m['static']['wall_s']:.3f} |",
        "", f"in-flight / static: {m['inflight_over_static']:.2f}x rows/s"])
