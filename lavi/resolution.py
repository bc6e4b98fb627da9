"""Dynamic resolution: the input contract of models that take each image at (about) its own size. Torch-free.

A square model gets every frame squashed to one side S (`ModelInfo.image_size`); a dynamic-resolution model gets each
image resized to its own (h, w): both multiples of `factor` (a patch times the spatial merge), the aspect ratio kept
as closely as that allows, the pixels between `min_pixels` and `max_pixels`. The arithmetic is transformers'
`smart_resize` (its image processors' and video processors'): a frame's bounds hold per frame, or (`per_clip`) for
the clip's frames together, T * h * w with T rounded to the temporal patch, in which case the size depends on the
clip's frame count too. The driver reads this contract from a checkpoint's config files (lavi.families.ModelInfo),
the decode workers resize to it (workers.dynamic), and the engine turns those frames into patches (its family's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, what the processors resize with unless their config says otherwise
MAX_ASPECT = 200  # transformers' smart_resize refuses a longer side over 200 times the shorter


@dataclass(frozen=True)
class Sizing:
    """How one kind of media (images, or a video's frames) is resized: the bounds, the factor, the filter."""

    min_pixels: int
    max_pixels: int
    factor: int  # both sides are multiples of it: patch_size * merge_size
    per_clip: bool = False  # the bounds hold for T * h * w over a clip's T frames (else for each frame's h * w)
    temporal_factor: int = 1  # frames per temporal patch: a clip's frame count is completed to a multiple of it
    resample: int = BICUBIC  # a PIL resampling filter code

    def __post_init__(self):
        if self.factor < 1 or self.temporal_factor < 1:
            raise ValueError(f"factor and temporal_factor must be >= 1, got {self.factor} and {self.temporal_factor}")
        if self.min_pixels < 0 or self.max_pixels < 1:  # transformers takes any other pair (min over max too)
            raise ValueError(f"need min_pixels >= 0 and max_pixels >= 1, got {self.min_pixels} and "
                             f"{self.max_pixels}: fix the processor config's sizes")

    def size(self, height: int, width: int, frames: int = 1) -> tuple[int, int]:
        """(h, w) of a frame of height x width, in a clip of `frames` frames (per_clip only: else it does not
        count). ValueError where the processor refuses it: an aspect ratio over MAX_ASPECT, or (per_clip) fewer
        frames than temporal_factor."""
        if height < 1 or width < 1:
            raise ValueError(f"empty frame: {width}x{height}")
        if self.per_clip:
            return _clip_size(frames, height, width, self.temporal_factor, self.factor, self.min_pixels,
                              self.max_pixels)
        return _frame_size(height, width, self.factor, self.min_pixels, self.max_pixels)

    def max_clip_pixels(self, frames: int) -> int:
        """About the most pixels a clip of `frames` frames holds once resized (what its memory is sized by): the
        bound, per frame or over the clip (T rounded to the temporal factor may undercount the frames by a few; a
        frame of extreme aspect ratio may pass a very small bound by up to a factor-wide strip)."""
        if not self.per_clip:
            return frames * self.max_pixels
        rounded = max(self.temporal_factor, round(frames / self.temporal_factor) * self.temporal_factor)
        return math.ceil(self.max_pixels * max(frames, rounded) / rounded)


@dataclass(frozen=True)
class DynamicResolution:
    """A model's dynamic-resolution contract: how images are resized, and how a video's frames are."""

    image: Sizing
    video: Sizing

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | DynamicResolution") -> "DynamicResolution":
        """From `dataclasses.asdict` of one (ModelInfo.as_dict's `dynamic`), or one itself."""
        if isinstance(d, DynamicResolution):
            return d
        return cls(image=Sizing(**d["image"]), video=Sizing(**d["video"]))


def aspect_error(height: int, width: int) -> str | None:
    """Why the processor refuses a frame of height x width, or None: transformers raises for an aspect ratio over
    MAX_ASPECT (a row error here, with this message)."""
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT:
        return f"aspect ratio {ratio:.0f}:1 ({width}x{height}) is over the {MAX_ASPECT}:1 the model's processor takes"
    return None


def _frame_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' qwen2_vl smart_resize (image and video processors), line for line."""
    if (why := aspect_error(height, width)) is not None:
        raise ValueError(why)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _clip_size(frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int,
               max_pixels: int) -> tuple[int, int]:
    """transformers' qwen3_vl video smart_resize (the bounds over T * h * w), line for line."""
    if frames < temporal_factor:
        raise ValueError(f"a clip of {frames} frames is shorter than the temporal patch of {temporal_factor} frames")
    if height < factor or width < factor:  # a side under one factor: scaled up first (int() as the reference)
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if (why := aspect_error(height, width)) is not None:
        raise ValueError(why)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
