"""transformers' LlavaOnevisionForConditionalGeneration with random weights of the same shapes, timed
through `generate()`: what a user would otherwise script.

Its visual token counts follow LLaVA-OneVision's own processing, not ours:
    image   one 384 px image = base view + one 384 px crop: 729 + 27 x (27 + 1 newline) = 1,485 tokens
    anyres  a 1152 px image = base + 3 x 3 crops (10 views): 729 + 81 x (81 + 1) = 7,371 tokens
    video   32 frames at 384 px, pooled 2x2 to 14 x 14 = 196 each, + 1 newline = 6,273 tokens
(`tokens` below computes them; the model raises if they disagree with its features.)
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from bench.configs import Setting


def hf_config(shapes: str, setting: Setting):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    if shapes == "qwen2-0.5b-siglip":
        text = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                           max_position_embeddings=32768, tie_word_embeddings=True)
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                                    num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)
        return LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    image_token_index=151646, video_token_index=151647, tie_word_embeddings=True)
    if shapes == "qwen2-7b-siglip":
        text = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                           max_position_embeddings=32768, tie_word_embeddings=False)
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                                    num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)
        return LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    image_token_index=151646, video_token_index=151647)
    if shapes == "tiny-random":
        size = setting.image_size
        text = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, patch_size=8, image_size=size,
                                    num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)
        grid = [[size * i, size * j] for i in (1, 2, 3) for j in (1, 2, 3)]
        return LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    image_token_index=62, video_token_index=63, image_grid_pinpoints=grid)
    raise ValueError(f"hf-llava-ov is built for qwen2-0.5b-siglip, qwen2-7b-siglip and tiny-random, not {shapes!r}")


def tokens(setting: Setting, crop: int, patch: int) -> tuple[int, dict]:
    """(visual tokens, how the inputs are shaped) for LLaVA-OV's processing of `setting`."""
    p = crop // patch
    if setting.name == "video":
        return setting.frames * math.ceil(p / 2) ** 2 + 1, {"video_frames": setting.frames}
    if setting.name == "image":
        gh, gw = 1, 1
    else:  # anyres: base view + crops of an image gh x gw crops large (10 views: 3 x 3; 3 views: 1 x 2)
        crops = setting.frames - 1
        gh = max(d for d in range(1, int(math.isqrt(crops)) + 1) if crops % d == 0)
        gw = crops // gh
    return p * p + (gh * p) * (gw * p + 1), {"views": gh * gw + 1, "image_px": (gh * crop, gw * crop)}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(shapes: str, setting: Setting, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The HF model, constructed directly on `device` in `dtype` (its own random init; buffers such as
    RoPE frequencies are computed there, which meta + to_empty would leave uninitialised)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = hf_config(shapes, setting)
    with torch.device(device), _default_dtype(dtype):
        model = LlavaOnevisionForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval()


def inputs(model, setting: Setting, batch: int, prompt_tokens: int, seed: int = 0) -> tuple[dict, int]:
    """generate() kwargs for `batch` rows of one visual input and `prompt_tokens` text tokens each."""
    cfg = model.config
    crop, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    n_vis, shape = tokens(setting, crop, patch)
    device, dtype = model.device, model.dtype
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    special = {cfg.image_token_index, cfg.video_token_index}
    text = torch.randint(0, min(vocab, 150000), (batch, prompt_tokens), generator=gen)
    text = torch.where(torch.isin(text, torch.tensor(sorted(special))), torch.zeros_like(text), text)
    vis_id = cfg.video_token_index if "video_frames" in shape else cfg.image_token_index
    ids = torch.cat([torch.full((batch, n_vis), vis_id), text], 1).to(device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "video_frames" in shape:
        kwargs["pixel_values_videos"] = torch.randn(batch, shape["video_frames"], 3, crop, crop, generator=gen).to(
            device, dtype)
    else:
        kwargs["pixel_values"] = torch.randn(batch, shape["views"], 3, crop, crop, generator=gen).to(device, dtype)
        kwargs["image_sizes"] = torch.tensor([list(shape["image_px"])] * batch, device=device)
    return kwargs, n_vis


@torch.no_grad()
def prefill_flops(model, kwargs: dict) -> int:
    """Counted FLOPs of one forward over the whole context (vision tower, projector, decoder, lm_head at the
    last position only, as generation needs), per row of `kwargs`."""
    from bench.flops import count

    flops, _ = count(model, **kwargs, logits_to_keep=1, use_cache=False)
    return flops // kwargs["input_ids"].shape[0]


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (its first `put` is the prompt)."""

    def __init__(self, sync) -> None:
        self.sync, self.calls, self.at = sync, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.sync()
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.no_grad()
def timed_generate(model, kwargs: dict, new_tokens: int) -> tuple[float, float]:
    """(time to first token, total) of one greedy generate() with exactly `new_tokens` tokens (EOS suppressed);
    the first token's time is taken inside the same call (a streamer), so the prompt is prefilled once."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    pad = model.config.text_config.pad_token_id if model.config.text_config.pad_token_id is not None else 0
    first = _FirstToken(sync)
    sync()
    start = time.perf_counter()
    out = model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=None, streamer=first)
    sync()
    total = time.perf_counter() - start
    if out.shape[1] - kwargs["input_ids"].shape[1] != new_tokens:
        raise RuntimeError(f"generate() returned {out.shape[1] - kwargs['input_ids'].shape[1]} new tokens, "
                           f"not {new_tokens}")
    if first.at is None:
        raise RuntimeError("generate() never streamed its first token")
    ttft = first.at - start
    return ttft, total
