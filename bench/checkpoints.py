"""`lavi-label bench model --model DIR`: real checkpoint directories instead of synthetic shapes.

A LLaVA-OneVision directory gives two kinds of rows on the same weights: `concat` (our engine's OneVision path:
anyres tiles, pooled video, the static-cache generation loop) and `hf-llava-ov` (transformers'
`LlavaOnevisionForConditionalGeneration.generate()`). A LaVi directory (tiny-shapes, a converted or trained LaVi)
gives `lavi` rows. The inputs are random uint8 pixels cut and normalised as a labelling job would, the prompt the
visual placeholder (OneVision) and `prompt_tokens` random text ids; every row generates exactly `new_tokens`.

Settings: `image` (one tile-sized image: the base view and its one crop), `anyres` (an image of the checkpoint's
largest pinpoint: the base view and every crop of that grid; OneVision only), `video` (the model's default frames).
FLOPs are not counted for checkpoint rows (the synthetic shapes count them).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bench.hf_rows import measure
from bench.model_config import CHECKPOINT_SETTINGS
from lavi.onevision import anyres
from lavi.serving.engine import Engine
from lavi.onevision.engine import OneVisionEngine
from workers.anyres import anyres_tiles

log = logging.getLogger(__name__)


def visual_input(engine: Engine, setting: str, seed: int) -> tuple[np.ndarray, tuple[str, tuple[int, int]]] | None:
    """One item of `setting` as the engine takes it: uint8 frames or tiles, and (kind, (height, width)). None: the
    model has no such input (anyres on a square-input LaVi, or a OneVision with one pinpoint)."""
    rng = np.random.default_rng(seed)
    tile = engine.image_size
    if setting == "video":
        return rng.integers(0, 256, (engine.default_frames, tile, tile, 3), dtype=np.uint8), ("video", (tile, tile))
    pinpoints = engine.pinpoints
    if pinpoints is None:
        if setting == "anyres":
            return None
        return rng.integers(0, 256, (1, tile, tile, 3), dtype=np.uint8), ("image", (tile, tile))
    size = (tile, tile) if setting == "image" else max(pinpoints, key=lambda p: p[0] * p[1])
    if setting == "anyres" and anyres.grid_shape(size, pinpoints, tile) == (1, 1):
        return None
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    return anyres_tiles(image, pinpoints, tile, engine.config.resample), ("image", size)


def _prompt(engine: Engine, kind: str, n: int, gen: torch.Generator) -> list[int]:
    config = engine.config
    vocab = config.decoder.vocab_size
    special = set(config.stop_ids) | {config.pad_token_id}
    if isinstance(engine, OneVisionEngine):
        special |= {config.image_token_id, config.video_token_id}
    ids = [t for t in torch.randint(0, vocab, (4 * n,), generator=gen).tolist() if t not in special][:n]
    if isinstance(engine, OneVisionEngine):
        return [config.image_token_id if kind == "image" else config.video_token_id] + ids
    return ids


def bench_checkpoint(runner, path: str) -> tuple[list[dict], list[dict]]:
    """Rows of one checkpoint directory over the run's settings (and transformers' on a OneVision), and the skips."""
    from bench import qwen
    from lavi.qwenvl.engine import QwenVLEngine

    c = runner.c
    engine = Engine.load(path, device=c.device, dtype=runner.dtype)
    onevision = isinstance(engine, OneVisionEngine)
    is_qwen = isinstance(engine, QwenVLEngine)  # its rows: qwen-vl (ours) and hf-qwen-vl (transformers')
    kind = qwen.ENGINE if is_qwen else "concat" if onevision or engine.config.fusion == "concat" else "lavi"
    rows, skipped = [], []
    for setting in c.settings or CHECKPOINT_SETTINGS:
        item = (qwen.checkpoint_input(path, engine, setting, c.seed) if is_qwen
                else visual_input(engine, setting, c.seed))
        if item is None:
            skipped.append({"model": kind, "setting": setting, "reason": f"{path} has no {setting} input"})
            continue
        visual, media = item
        if is_qwen:
            prompt = qwen.prompt_ids(engine.config, qwen.VIDEO if media[0] == "video" else qwen.IMAGE,
                                     c.prompt_tokens, runner.gen)
        else:
            prompt = _prompt(engine, media[0], c.prompt_tokens, runner.gen)
        vis = engine._encode([visual], [media])
        nv = int(vis.mask.sum())
        if is_qwen:  # the prompt as the model expands it (a Qwen3-VL video's timestamps too)
            valid = torch.ones(1, len(prompt), dtype=torch.bool)
            max_seq = len(engine.model.rows(vis, torch.tensor([prompt]), valid)[0]) + c.new_tokens
        else:
            max_seq = len(prompt) - int(onevision) + (nv if kind == "concat" else 0) + c.new_tokens
        del vis

        def inputs(b: int, visual=visual, media=media, prompt=prompt):
            return (lambda: engine._encode([visual] * b, [media] * b)), torch.arange(b), [prompt] * b

        probe = runner.probe(runner._try_engine(engine.model, inputs, max_seq))
        common = {"model": kind, "checkpoint": path, "shapes": Path(path).name, "setting": setting,
                  "frames": len(visual), "image_size": list(media[1]), "visual_tokens": nv,
                  "prompt_tokens": c.prompt_tokens, "new_tokens": c.new_tokens,
                  "dtype": str(runner.dtype).removeprefix("torch."), "compiled": runner.compile and c.compile_backend,
                  "generator": "lavi.serving.generate.Generator"}
        if is_qwen:
            common["context_tokens"] = max_seq - c.new_tokens
        for b in runner._sizes(probe, [1, 4] if is_qwen else [1, 8, 32]):
            log.info("bench %s %s %s batch %d", path, kind, setting, b)
            rows.append({**common, **runner.measure(engine.model, inputs, b, max_seq)})
        if is_qwen and qwen.HF in (c.models or (qwen.HF,)):
            rows += qwen.checkpoint_rows(runner, path, engine, common, visual, media, prompt)
        if onevision and "hf-llava-ov" in (c.models or ("hf-llava-ov",)):
            rows += _bench_transformers(runner, path, engine.config, setting, visual, media, prompt, nv)
    del engine
    runner._release()
    return rows, skipped


def _bench_transformers(runner, path: str, config, setting: str, visual: np.ndarray, media, prompt: list[int],
                        nv: int) -> list[dict]:
    """transformers' generate() on the checkpoint's own weights, the same pixels and prompt, the placeholder
    expanded as its processor expands it."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lavi.onevision.model import pixels

    c = runner.c
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=runner.dtype).to(runner.device).eval()
    x = pixels(visual, config).to(runner.device, runner.dtype)
    expanded = prompt[:1] * nv + prompt[1:]
    rows = []
    for b in runner._sizes([], [1, 8]):
        ids = torch.tensor([expanded] * b, device=runner.device)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if media[0] == "video":
            kwargs["pixel_values_videos"] = x[None].expand(b, *x.shape).contiguous()
        else:
            kwargs["pixel_values"] = x[None].expand(b, *x.shape).contiguous()
            kwargs["image_sizes"] = torch.tensor([list(media[1])] * b, device=runner.device)
        rows.append({"model": "hf-llava-ov", "checkpoint": path, "shapes": Path(path).name, "setting": setting,
                     "frames": len(visual), "visual_tokens": nv, "prompt_tokens": c.prompt_tokens,
                     "new_tokens": c.new_tokens, "dtype": str(runner.dtype).removeprefix("torch."),
                     "generator": "transformers generate()", **measure(runner, model, kwargs)})
    del model
    runner._release()
    return rows

