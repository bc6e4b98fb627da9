"""The LLaVA-OneVision family (lavi.families): a Hugging Face `llava_onevision` directory. Torch-free."""
from __future__ import annotations

from typing import Any, Callable

from lavi.onevision.config import MODEL_TYPE

ENGINE = "lavi.onevision.engine:OneVisionEngine"
CONVERT = "lavi.onevision.convert:convert"


def claims(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def describe(config: dict[str, Any], read: Callable[[str], dict | None], name: str):
    from lavi.families import LLAVA_OV, ModelInfo
    from lavi.onevision.config import DEFAULT_PROMPTS, OneVisionConfig

    c = OneVisionConfig.from_hf(config, read("preprocessor_config.json") or {}, name=name)
    return ModelInfo(name=c.name, family=LLAVA_OV, fusion=LLAVA_OV, vision_in_context=True,
                     image_size=c.tile_size, pinpoints=c.pinpoints,
                     default_frames=c.default_frames, max_frames=c.max_frames,
                     default_prompts=dict(c.default_prompts or DEFAULT_PROMPTS))


def load(path, device="cpu", dtype=None):
    from lavi.onevision import checkpoint

    return checkpoint.load(path, device=device, dtype=dtype)
