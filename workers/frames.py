"""Shared parts of the decoders: the error, the decoded results, the content sniff and the resize to model input."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from schemas.rows import IMAGE, VIDEO


# What a video's frames are resized to: a square side S, or a callable (H, W, 3) -> (h, w, 3) uint8 that gives every
# frame of a clip one size (workers.dynamic.ClipFit, a dynamic-resolution model's)
Fit = int | Callable[[np.ndarray], np.ndarray]


class DecodeError(Exception):
    """Bad input media; `str(err)` is a message fit for a row."""


@dataclass(frozen=True)
class DecodedImage:
    frames: np.ndarray  # (1, S, S, 3) uint8, RGB; anyres (1 + tiles, S, S, 3); dynamic resolution (1, h, w, 3)
    width: int  # original size, after EXIF orientation
    height: int


@dataclass(frozen=True)
class Clip:
    index: int
    start_s: float
    end_s: float
    timestamps_s: list[float]  # presentation time of each frame given to the model
    frames: np.ndarray  # (F, S, S, 3) uint8, RGB; dynamic resolution (F, h, w, 3)


@dataclass(frozen=True)
class DecodedVideo:
    clips: list[Clip]
    width: int
    height: int
    duration_s: float
    decoder: str  # "decord" or "pyav"
    note: str | None = None  # e.g. why the fallback ran; for logs, never for rows


def to_model_input(im: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image -> (size, size, 3) uint8, squashed (no crop, no pad) with bicubic."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def rgb_array_to_model_input(frame: np.ndarray, size: Fit) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, the same resize as images get; or what a callable `size` (a
    dynamic-resolution model's workers.dynamic.ClipFit) makes of it."""
    if not isinstance(size, int):
        return size(frame)
    if frame.shape[:2] == (size, size):
        return np.ascontiguousarray(frame, dtype=np.uint8)
    return to_model_input(Image.fromarray(frame), size)


_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\]\s*\S+:\d+:\s*")  # "[15:22:00] /src/x.cc:83: "
_AV_NOISE = re.compile(r"\[Errno -?\d+\] |: '<none>'|last error log: \[[^\]]*\] ")  # PyAV's wrapping


def clean_message(text: str, limit: int = 200) -> str:
    """A decoder message made safe for a row: printable ASCII, no source paths, no raw bytes."""
    text = _AV_NOISE.sub("", _DECORD_PREFIX.sub("", text))
    # decord: "ERROR opening: <the raw input bytes>, <reason>" -> keep the reason
    if text.startswith("ERROR opening:") and "," in text:
        text = "cannot open: " + text.rsplit(",", 1)[-1].strip()
    text = "".join(c if " " <= c <= "~" else " " for c in text)
    text = " ".join(text.split())
    return text[:limit] if len(text) <= limit else text[: limit - 3] + "..."


def sniff_media_type(data: bytes) -> str | None:
    """'image' or 'video' from the magic bytes, or None when the content is not recognised."""
    head = data[:16]
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")):
        return IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return VIDEO
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        return IMAGE  # HEIF/AVIF stills: PIL refuses them as "not an image" without a plugin
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return VIDEO  # ISO BMFF / QuickTime (mp4, mov, m4v)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return VIDEO  # Matroska / WebM
    return None
