"""`bench model` for the Qwen-VL family: our engine (`qwen-vl` rows) and transformers' `generate()` (`hf-qwen-vl`
rows) on the same weights, the same pixels and the same expanded prompt, greedy, exactly `new_tokens` each.

Two ways in: a checkpoint directory (`bench.checkpoints`; transformers' model loaded from it, its images cut by
Qwen2VLImageProcessorPil, videos by our `pixel_values` as transformers' video processor needs torchvision), or a shape
(`bench_shapes`): transformers builds a Qwen2.5-VL of the hub config's shapes with random weights, its rows are
measured, and our model is then made of the very same tensors (no copy: transformers' model is dropped before ours
is packed, so one model's weights are in memory at a time). The LaVi rows beside them (`bench.configs`) have the
same decoder.

The Qwen's prefill FLOPs are counted on transformers' forward over the expanded context (logits at the last
position); a decode step's are the decoder's over the static cache's slots (ours) or the growing cache (theirs).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

import torch
from torch import Tensor

from bench import flops as F
from bench import hf
from bench import roofline as R
from bench.configs import Setting
from bench.qwen_shapes import SHAPES, hub_config
from bench.hf_rows import measure as hf_measure
from bench.report import versions
from lavi.core.decoder import Decoder
from lavi.families import QWEN_VL
from lavi.qwenvl import checkpoint as qwen_checkpoint
from lavi.qwenvl import layout
from lavi.qwenvl.config import IMAGE, VIDEO, QwenVLConfig
from lavi.qwenvl.model import QwenVL

log = logging.getLogger(__name__)
ENGINE, HF = QWEN_VL, f"hf-{QWEN_VL}"  # the rows' model names: our engine's, transformers'
MODELS = (ENGINE, HF)


def build_hf(shapes: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """transformers' model of `shapes` with its own random init, made on `device` in `dtype`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = hub_config(shapes)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    with torch.device(device), hf._default_dtype(dtype):
        model = AutoModelForImageTextToText.from_config(config)
    return model.to(device=device, dtype=dtype).eval()


def ours_from(theirs) -> QwenVL:
    """Our QwenVL made of transformers' model's own tensors (assigned, not copied)."""
    config = QwenVLConfig.from_hf(theirs.config.to_dict(), name=theirs.config.model_type)
    weights = qwen_checkpoint.ours(theirs.state_dict())
    with torch.device("meta"):
        decoder = Decoder(config.decoder)
    model = QwenVL(config, decoder=decoder)
    tied = config.decoder.tie_word_embeddings
    if tied:
        weights.pop("decoder.lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "decoder.lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"transformers' weights do not map onto ours: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    if tied:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"transformers' weights left {left[:5]} unset")
    return model.to(device=theirs.device, dtype=theirs.dtype).eval()  # the tower's tables; the weights stay shared


def patches_of(c: QwenVLConfig, setting: Setting, gen: torch.Generator) -> tuple[Tensor, list[int]]:
    """Random normalised pixels of one item of `setting` as the processor lays them out (t*h*w, C*tp*p*p), and its
    grid (t, h, w) in patches."""
    side = setting.image_size // c.patch_size
    t = -(-setting.frames // c.temporal_patch_size)
    grid = [t, side, side]
    return torch.randn(t * side * side, 3 * c.temporal_patch_size * c.patch_size ** 2, generator=gen), grid


def prompt_ids(c: QwenVLConfig, kind: int, n: int, gen: torch.Generator) -> list[int]:
    """The chat template's visual block (start, placeholder, end) and `n` random text ids (no special ones)."""
    special = {c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id, c.pad_token_id,
               *c.eos_token_ids}
    ids = [t for t in torch.randint(0, c.decoder.vocab_size, (4 * n + 8,), generator=gen).tolist()
           if t not in special][:n]
    placeholder = c.image_token_id if kind == IMAGE else c.video_token_id
    return [c.vision_start_token_id, placeholder, c.vision_end_token_id] + ids


def hf_kwargs(c: QwenVLConfig, pixels: Tensor, grid: list[int], kind: int, seconds: float, prompt: list[int],
              batch: int, device: torch.device, dtype: torch.dtype, stamps: Sequence[Sequence[int]] = ()) -> dict:
    """generate() kwargs of `batch` copies of one item: its pixels as the processor gives them (t*h*w, C*tp*p*p), the
    prompt's placeholder expanded as the processor expands it (`layout.expand`; stamps: a Qwen3-VL video's)."""
    ids = torch.tensor([layout.expand(c, prompt, kind, grid, stamps)] * batch, device=device)
    types = (ids == c.image_token_id).long() + 2 * (ids == c.video_token_id).long()
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types}
    x, g = pixels.repeat(batch, 1).to(device, dtype), torch.tensor([grid] * batch, device=device)
    if kind == IMAGE:
        return {**out, "pixel_values": x, "image_grid_thw": g}
    out.update(pixel_values_videos=x, video_grid_thw=g)
    if c.tokens_per_second:
        out["second_per_grid_ts"] = torch.tensor([seconds] * batch, device=device)
    return out


def transformers_rows(runner, model, kwargs_of, sizes: list[int], common: dict, counted: int | None,
                      decoder_of) -> list[dict]:
    """transformers' generate() rows at each batch size; `kwargs_of(b)` -> its kwargs. counted: one row's prefill
    FLOPs (None: not counted), `decoder_of` the config whose decoder prices its decode steps."""
    rows = []
    for b in sizes:
        kwargs = kwargs_of(b)
        log.info("bench %s %s batch %d", HF, common["setting"], b)
        r = {**common, "model": HF, "generator": "transformers generate()",
             "context_tokens": kwargs["input_ids"].shape[1], **hf_measure(runner, model, kwargs)}
        if counted is not None:
            caption = counted + F.growing_decode_flops(decoder_of, kwargs["input_ids"].shape[1], runner.c.new_tokens)
            r.update(prefill_flops=counted, prefill_flops_analytic=counted, caption_flops=caption,
                     **runner._utilization(r, counted, caption))
        rows.append(r)
    return rows


def decode_weight_bytes(model: QwenVL) -> int:
    """What one decode step reads of the weights: the decoder's layers, its final norm and its output head."""
    dec = model.decoder
    parts = (dec.layers, dec.norm, dec.lm_head)
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def bench_shapes(runner, setting: Setting) -> tuple[list[dict], list[dict], str | None]:
    """transformers' rows, then our engine's on the same tensors, at one setting of a Qwen shape: (rows, roofline,
    the reason there are none). Batch sizes: the run's, else 1 and 4 (CPU) or the probe's largest (CUDA)."""
    c = runner.c
    wanted = [m for m in (c.models or MODELS) if m in MODELS]
    if c.shapes not in SHAPES:
        return [], [], f"{', '.join(MODELS)} are built for the shapes {', '.join(SHAPES)}, not {c.shapes}"
    runner.mem.rebase()
    try:
        theirs = build_hf(c.shapes, runner.device, runner.dtype, seed=c.seed)
    except (ImportError, TypeError, ValueError) as err:
        return [], [], f"transformers {versions().get('transformers')}: {type(err).__name__}: {str(err)[:300]}"
    model = ours_from(theirs)
    config = model.config
    kind = VIDEO if setting.name == "video" else IMAGE
    pixels, grid = patches_of(config, setting, runner.gen)
    seconds = config.temporal_patch_size / 2.0 if kind == VIDEO else 1.0  # frames at 2 fps
    prompt = prompt_ids(config, kind, c.prompt_tokens, runner.gen)
    with torch.inference_mode():
        one = hf_kwargs(config, pixels, grid, kind, seconds, prompt, 1, runner.device, runner.dtype)
        counted = hf.prefill_flops(theirs, one)
    context = one["input_ids"].shape[1]
    nv = int((one["mm_token_type_ids"] > 0).sum())
    max_seq = context + c.new_tokens
    common = {"shapes": c.shapes, "setting": setting.name, "frames": setting.frames,
              "image_size": setting.image_size, "visual_tokens": nv, "context_visual_tokens": nv,
              "prompt_tokens": c.prompt_tokens, "new_tokens": c.new_tokens, "context_tokens": context,
              "dtype": str(runner.dtype).removeprefix("torch.")}
    sizes = runner._sizes([], [1, 4] if runner.device.type != "cuda" else [1, 8])
    rows = []
    if HF in wanted:
        kw = lambda b: hf_kwargs(config, pixels, grid, kind, seconds, prompt, b, runner.device, runner.dtype)  # noqa
        rows += transformers_rows(runner, theirs, kw, sizes, common, counted, config)
    del theirs, one
    runner._release()
    if ENGINE not in wanted:
        return rows, [], None
    weights = decode_weight_bytes(model)  # counted before packing: a packed layer's weight is no parameter
    model = runner._packed(model)  # transformers' model is gone: our packed layers replace the only float copy
    runner._release()
    rows_, roofs = engine_rows(runner, model, setting, pixels, grid, kind, seconds, prompt, sizes, common, counted,
                               max_seq, weights)
    del model
    runner._release()
    return rows + rows_, roofs, None


def engine_rows(runner, model: QwenVL, setting: Setting, pixels: Tensor, grid: list[int], kind: int, seconds: float,
                prompt: list[int], sizes: list[int], common: dict, counted: int, max_seq: int, weights: int
                ) -> tuple[list[dict], list[dict]]:
    """Our engine's rows (the static-cache generation loop, `Runner.measure`) and its batch-1 decode roofline
    (`weights`: the bytes a decode step reads, `decode_weight_bytes`)."""
    def inputs(b: int):
        x, g = pixels.repeat(b, 1), torch.tensor([grid] * b)
        return (lambda: model.encode(x, g, [kind] * b, [seconds] * b)), torch.arange(b), [prompt] * b

    steps = (runner.c.new_tokens - 1) * (F.decoder_flops(model.config, 1, max_seq)
                                        + 2 * model.config.decoder.hidden_size * model.config.decoder.vocab_size)
    rows, roofs = [], []
    for b in sizes:
        log.info("bench %s %s batch %d", ENGINE, setting.name, b)
        r = {**common, "model": ENGINE, "generator": "lavi.serving.generate.Generator", "max_seq": max_seq,
             "compiled": runner.compile and runner.c.compile_backend, **runner.measure(model, inputs, b, max_seq),
             "prefill_flops": counted, "prefill_flops_analytic": counted, "caption_flops": counted + steps}
        rows.append({**r, **runner._utilization(r, counted, counted + steps)})
    one = next((r for r in rows if r["batch_size"] == 1), None)
    if one is not None:
        if runner.compile:
            alone, linears = None, R.linears_step_s(model)
        else:
            encode, one_row, _ = inputs(1)
            with torch.inference_mode():
                vis = encode().select(one_row.to(runner.device))
            alone, linears = R.step_alone(model, vis, max_seq, runner.c.new_tokens)
        state = R.state_bytes(model.config, setting, max_seq, ENGINE, runner.dtype)
        roofs.append(R.entry(ENGINE, setting, weights, state, one["decode_step_s"], linears,
                             R.linears_bytes(model), alone))
    return rows, roofs


# -- a checkpoint directory (bench.checkpoints) ---------------------------------------------------------------------
def checkpoint_side(path: str, engine) -> int:
    """The square side a benchmark's images and frames have: the engine's, within what the checkpoint's processors
    take without resizing (max_pixels), a multiple of the merged patch."""
    from lavi.qwenvl.processor_config import ProcessorConfig

    c = engine.config
    read = lambda name: json.loads((Path(path) / name).read_text()) if (Path(path) / name).exists() else None  # noqa
    pc = ProcessorConfig.read(c.kind, read)
    most = min(pc.image.max_pixels, pc.video.max_pixels)
    return max(c.factor, min(engine.image_size, math.isqrt(most) // c.factor * c.factor))


def checkpoint_input(path: str, engine, setting: str, seed: int) -> tuple[np.ndarray, tuple] | None:
    """One item of `setting` (image, video; None: anyres, which a Qwen-VL has not) as the engine takes it."""
    if setting == "anyres":
        return None
    side = checkpoint_side(path, engine)
    rng = np.random.default_rng(seed)
    n = engine.default_frames if setting == "video" else 1
    frames = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    if setting == "video":
        return frames, ("video", (side, side), [i / 2.0 for i in range(n)])  # 2 fps
    return frames, ("image", (side, side))


def checkpoint_rows(runner, path: str, engine, common: dict, visual: np.ndarray, media: tuple,
                    prompt: list[int]) -> list[dict]:
    """transformers' generate() on the checkpoint's own weights, the same pixels (an image through its
    Qwen2VLImageProcessorPil, a video through our `pixel_values`: its video processor needs torchvision) and prompt."""
    from transformers import AutoModelForImageTextToText

    from lavi.qwenvl.engine import frame_times, seconds_per_patch
    from lavi.qwenvl.pixels import pixel_values

    c = engine.config
    video = media[0] == "video"
    if video:
        x, grid = pixel_values(visual, engine.processor.video)
        grid = list(grid)
        times = frame_times(len(visual), media[2] if len(media) > 2 else None)
        seconds = seconds_per_patch(times, c.temporal_patch_size)
        stamps = engine._stamps(times) if c.stamped else ()
    else:
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        out = Qwen2VLImageProcessorPil.from_pretrained(path)(images=Image.fromarray(visual[0]), return_tensors="pt")
        x, grid, seconds, stamps = out["pixel_values"], out["image_grid_thw"][0].tolist(), 1.0, ()
        if grid != list(pixel_values(visual[:1], engine.processor.image)[1]):
            raise ValueError(f"{path}: the image processor's grid {grid} is not ours; the benchmark's image must "
                             "not be resized")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=runner.dtype).to(runner.device).eval()
    kind = VIDEO if video else IMAGE
    kw = lambda b: hf_kwargs(c, x, grid, kind, seconds, prompt, b, runner.device, runner.dtype, stamps)  # noqa: E731
    rows = transformers_rows(runner, model, kw, runner._sizes([], [1, 4]), common, None, c)
    del model
    runner._release()
    return rows
