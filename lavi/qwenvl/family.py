"""The Qwen-VL family (lavi.families): a Hugging Face `qwen2_vl`, `qwen2_5_vl` or `qwen3_vl` directory. Torch-free.

Its input contract is dynamic resolution (lavi.resolution): the image and video processors' configs
(lavi.qwenvl.processor_config) say how the decode workers resize each image and each clip's frames, and the engine
computes the pixel values from those frames with the same processors (lavi.qwenvl.pixels).

It also claims the line's model types it does not implement (`kinds.REFUSED`), so that loading one is refused with
what it lacks rather than as an unknown model type."""
from __future__ import annotations

from typing import Any, Callable

from lavi.qwenvl.kinds import COMPRESS_METHODS, MODEL_TYPES, REFUSED

ENGINE = "lavi.qwenvl.engine:QwenVLEngine"
CONVERT = "lavi.qwenvl.convert:convert"
HUGE = 1 << 15  # a frame side far over any max_pixels: smart_resize brings it down to the largest the bound takes


def claims(config: dict[str, Any]) -> bool:
    return config.get("model_type") in MODEL_TYPES or config.get("model_type") in REFUSED


def describe(config: dict[str, Any], read: Callable[[str], dict | None], name: str):
    from lavi.families import QWEN_VL, ModelInfo
    from lavi.qwenvl.config import QwenVLConfig

    c = QwenVLConfig.from_hf(config, read("generation_config.json") or {}, name=name)
    dynamic = processors(c, read).contract
    return ModelInfo(name=c.name, family=QWEN_VL, fusion=QWEN_VL, vision_in_context=True,
                     image_size=largest_square(dynamic.image), default_frames=c.default_frames,
                     max_frames=c.max_frames, default_prompts=dict(c.default_prompts), dynamic=dynamic,
                     compress_methods=COMPRESS_METHODS)


def processors(c, read: Callable[[str], dict | None]):
    """The checkpoint's image and video processors (`ProcessorConfig.read`), refused (UnsupportedCheckpoint, one
    line) where their patches are not the tower's: pixel values of another patch, merge or temporal size would not
    fit its input (transformers would fail on them too)."""
    from lavi.qwenvl.config import UnsupportedCheckpoint
    from lavi.qwenvl.processor_config import ProcessorConfig

    try:
        proc = ProcessorConfig.read(c.kind, read)
    except ValueError as err:
        raise UnsupportedCheckpoint(str(err)) from None
    tower = (c.patch_size, c.merge_size, c.temporal_patch_size)
    for what, media in (("image", proc.image), ("video", proc.video)):
        mine = (media.patch_size, media.merge_size, media.temporal_patch_size)
        if mine != tower:
            raise UnsupportedCheckpoint(f"the {what} processor's patch, merge and temporal sizes {mine} are not the "
                                        f"vision tower's {tower} (config.json): fix the processor config")
    return proc


def largest_square(sizing, frames: int = 1) -> int:
    """The side of the largest square frame `sizing` (a lavi.resolution.Sizing) gives, in a clip of `frames`
    (ModelInfo.image_size of a dynamic-resolution model: the frames never use it)."""
    return sizing.size(HUGE, HUGE, frames)[0]


def largest_frame(sizing, frames: int = 1) -> tuple[int, int]:
    """The (h, w) of the most pixels `sizing` gives a frame in a clip of `frames` (the engine's memory probe): a
    square may fall a few percent short of the bound where its side is not a whole number of factors, and under a
    small bound a thin frame's narrow side rounds up to one factor, past it; so huge frames of aspect ratios 1 to 4
    in steps of 1/64, and on to the most the processor takes (MAX_ASPECT), are resized and the largest result taken."""
    from lavi.resolution import MAX_ASPECT

    widths = [HUGE * k // 64 for k in range(64, 257)] + [int(HUGE * MAX_ASPECT ** (i / 200)) for i in range(201)]
    sizes = [sizing.size(HUGE, w, frames) for w in widths]
    return max(sizes, key=lambda hw: (hw[0] * hw[1], -abs(hw[0] - hw[1])))


def load(path, device="cpu", dtype=None):
    from lavi.qwenvl import checkpoint

    return checkpoint.load(path, device=device, dtype=dtype)
