"""The LaVi family (lavi.families): a checkpoint of this project's own, its config.json a `LaViConfig`. Torch-free."""
from __future__ import annotations

from typing import Any, Callable

ENGINE = "lavi.serving.engine:Engine"
CONVERT = None  # a LaVi is what convert makes


def claims(config: dict[str, Any]) -> bool:
    return config.get("model_type") is None and "decoder" in config


def describe(config: dict[str, Any], read: Callable[[str], dict | None], name: str):
    from lavi.core.config import CONTEXT_FUSION, LaViConfig
    from lavi.families import LAVI, ModelInfo

    c = LaViConfig.from_dict(config)
    image_size, dynamic = (c.vision.image_size, None) if c.processor is None else _dynamic(c.processor)
    return ModelInfo(name=c.name, family=LAVI, fusion=c.fusion,
                     vision_in_context=c.fusion == CONTEXT_FUSION, image_size=image_size,
                     default_frames=c.default_frames, max_frames=c.max_frames, default_prompts=dict(c.default_prompts),
                     dynamic=dynamic)


def _dynamic(processor: dict[str, Any]):
    """A Qwen-VL ViT's LaVi: (the square side a probe takes, the dynamic-resolution contract of its processors)."""
    from lavi.qwenvl.processor_config import ProcessorConfig

    p = ProcessorConfig.from_dict(processor)
    return p.image.square_side, p.contract


def load(path, device="cpu", dtype=None):
    from lavi.core import checkpoint

    return checkpoint.load(path, device=device, dtype=dtype)
