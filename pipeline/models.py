"""What the driver knows of a model before any worker loads it: its name and input contract, from its config files.

The driver never loads torch for this: the decode stages need the input contract (the square size, anyres
pinpoints, frames per clip) and the output needs the model's name, and both are in config.json (and
preprocessor_config.json for a LLaVA-OneVision).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.storage import filesystem


def model_info(model: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """name, input contract (image_size, anyres pinpoints) and frames of a checkpoint, from its config files only:
    a LaVi, or a Hugging Face LLaVA-OneVision (model_type llava_onevision). Anything else is refused by name."""
    from lavi.config import LaViConfig
    from lavi.onevision_config import DEFAULT_PROMPTS, MODEL_TYPE, OneVisionConfig

    fs, path = filesystem(model, storage_options)
    base = path.rstrip("/")
    if not fs.exists(f"{base}/config.json"):
        raise ValueError(f"--model {model!r} is not a checkpoint directory (no config.json)")
    hf = json.loads(fs.cat_file(f"{base}/config.json"))
    kind = hf.get("model_type")
    if kind == MODEL_TYPE:
        pre = json.loads(fs.cat_file(f"{base}/preprocessor_config.json")) if fs.exists(
            f"{base}/preprocessor_config.json") else {}
        ov = OneVisionConfig.from_hf(hf, pre, name=base.rsplit("/", 1)[-1])
        return {"name": ov.name, "fusion": "llava-ov", "image_size": ov.tile_size, "pinpoints": ov.pinpoints,
                "default_frames": ov.default_frames, "max_frames": ov.max_frames,
                "default_prompts": dict(ov.default_prompts or DEFAULT_PROMPTS)}
    if kind is not None or "decoder" not in hf:
        raise ValueError(f"--model {model!r} is a {kind!r} checkpoint; supported: a LaVi checkpoint or a "
                         f"LLaVA-OneVision ({MODEL_TYPE!r})")
    config = LaViConfig.from_dict(hf)
    return {"name": config.name, "fusion": config.fusion, "image_size": config.vision.image_size, "pinpoints": None,
            "default_frames": config.default_frames, "max_frames": config.max_frames,
            "default_prompts": dict(config.default_prompts)}
