"""Frames at a dynamic-resolution model's input (lavi.resolution): each image at its own size, resized with PIL as
the model's image processor resizes (transformers' Qwen2VLImageProcessorPil, to the pixel), uint8 RGB.

An image becomes (1, h, w, 3), its (h, w) from its own size (`Sizing.size`). A video's frames go through a
`ClipFit`: the first frame fixes the size (from its native size and the clip's frame count) and every frame of the
decode call is resized to it, so a clip's frames always stack. A size the processor refuses (an aspect ratio over
200:1) is a DecodeError: a row error, never a crash.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from lavi.resolution import Sizing, aspect_error
from workers.frames import DecodeError, Fit
from workers.settings import DecodeSettings


def resized(im: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """An RGB PIL image -> (h, w, 3) uint8 at size (h, w) (PIL keeps an image already that size as it is)."""
    h, w = size
    if im.size != (w, h):
        im = im.resize((w, h), resample)
    return np.asarray(im, dtype=np.uint8)


def image_input(im: Image.Image, sizing: Sizing) -> np.ndarray:
    """An upright RGB PIL image -> (1, h, w, 3) uint8 at the model's dynamic resolution."""
    if (why := aspect_error(im.height, im.width)) is not None:
        raise DecodeError(f"image {why}")
    size = sizing.size(im.height, im.width)
    if min(size) < 1:  # a contract whose min_pixels lets a thin side round to nothing (transformers' would fail too)
        raise DecodeError(f"image of {im.width}x{im.height} resizes to nothing under min_pixels {sizing.min_pixels}")
    return resized(im, size, sizing.resample)[None]


class ClipFit:
    """Resizes a video's frames ((H, W, 3) uint8 each) to the dynamic resolution of a clip of `frames` frames; the
    first frame fixes the size for every later one (a stream that changes resolution still gives clips that stack).
    Picklable: the isolated decoders get it as an argument."""

    def __init__(self, sizing: Sizing, frames: int):
        self.sizing, self.frames = sizing, frames
        self.size: tuple[int, int] | None = None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.size is None:
            height, width = frame.shape[:2]
            if (why := aspect_error(height, width)) is not None:
                raise DecodeError(f"video frames {why}")
            try:
                self.size = self.sizing.size(height, width, self.frames)
            except ValueError as err:  # what the processor refuses
                raise DecodeError(f"video frames: {err}") from err
        if frame.shape[:2] == self.size:
            return np.ascontiguousarray(frame, dtype=np.uint8)
        return resized(Image.fromarray(frame), self.size, self.sizing.resample)


def video_fit(settings: DecodeSettings) -> Fit:
    """What a video's frames are resized to under `settings`: the square side, or a fresh ClipFit (one per decode
    call: a video, or one clip group of it)."""
    if settings.dynamic is None:
        return settings.image_size
    return ClipFit(settings.dynamic.video, settings.frames_per_clip)
