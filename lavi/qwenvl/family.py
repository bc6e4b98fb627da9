"""The Qwen-VL family (lavi.families): a Hugging Face `qwen2_vl`, `qwen2_5_vl` or `qwen3_vl` directory. Torch-free.

It also claims the line's model types it does not implement (`config.REFUSED`), so that loading one is refused with
what it lacks rather than as an unknown model type."""
from __future__ import annotations

from typing import Any, Callable

from lavi.qwenvl.config import MODEL_TYPES, REFUSED

ENGINE = "lavi.qwenvl.engine:QwenVLEngine"
CONVERT = "lavi.qwenvl.convert:convert"


def claims(config: dict[str, Any]) -> bool:
    return config.get("model_type") in MODEL_TYPES or config.get("model_type") in REFUSED


def describe(config: dict[str, Any], read: Callable[[str], dict | None], name: str):
    from lavi.families import QWEN_VL, ModelInfo
    from lavi.qwenvl.config import QwenVLConfig

    c = QwenVLConfig.from_hf(config, read("generation_config.json") or {}, name=name)
    return ModelInfo(name=c.name, family=QWEN_VL, fusion=QWEN_VL, vision_in_context=True, image_size=square_side(c),
                     default_frames=c.default_frames, max_frames=c.max_frames, default_prompts=dict(c.default_prompts))


def square_side(c) -> int:
    """The square side frames are resized to until the decode workers resize to the dynamic-resolution contract
    (min/max pixels, sides multiples of `c.factor`): 448 px rounded to a multiple of the factor."""
    return c.factor * max(1, round(448 / c.factor))


def load(path, device="cpu", dtype=None):
    from lavi.qwenvl import checkpoint

    return checkpoint.load(path, device=device, dtype=dtype)
