"""Image bytes -> the model's RGB input (a square, anyres tiles or its own dynamic resolution), refusing
decompression bombs before decoding."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from workers.dynamic import image_input
from workers.frames import DecodedImage, DecodeError, to_model_input
from workers.anyres import anyres_tiles
from lavi.resolution import Sizing, aspect_error

# Formats PIL may open. Others (EPS runs Ghostscript, etc.) are refused as "not an image".
# The JPEG plugin also opens MPO, the multi-picture JPEG that phones write.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited over white; 16/32-bit grey is scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im).astype(np.float64) / 65535.0 * 255.0  # 16-bit range -> 8-bit
        im = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, image_size: int, max_pixels: int,
                 pinpoints: tuple[tuple[int, int], ...] | None = None, dynamic: Sizing | None = None) -> DecodedImage:
    """Image bytes -> DecodedImage with frames (1, S, S, 3) uint8 RGB, S = image_size.

    The pixel count is read from the header and checked against `max_pixels` before any
    pixel is decoded. EXIF orientation is applied (width/height are the upright size);
    animated images give their first frame. With `pinpoints` (an anyres model), frames are the base view
    and the grid's tiles instead (T, S, S, 3) (`workers.anyres.anyres_tiles`). With `dynamic` (a
    dynamic-resolution model's image sizing), frames are (1, h, w, 3) at the image's own resolution
    (workers.dynamic.image_input); an aspect ratio the model's processor refuses is refused from the header.
    Raises DecodeError with a row-ready message.
    """
    if not data:
        raise DecodeError("empty file")
    Image.init()  # registers every plugin: Image.open(formats=...) looks them up by name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: reads the header only
        except UnidentifiedImageError as err:
            raise DecodeError("not an image: cannot identify format") from err
        except Image.DecompressionBombError as err:
            raise DecodeError(f"image too large: {err}") from err
        except _PIL_ERRORS as err:
            raise DecodeError(f"corrupt image header: {type(err).__name__}: {err}") from err
        with im:
            return _decode_opened(im, image_size, max_pixels, pinpoints, dynamic)


def _decode_opened(im: Image.Image, image_size: int, max_pixels: int,
                   pinpoints: tuple[tuple[int, int], ...] | None, dynamic: Sizing | None) -> DecodedImage:
    width, height = im.size
    if width * height > max_pixels:
        raise DecodeError(
            f"image too large: {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (possible decompression bomb)"
        )
    if width == 0 or height == 0:
        raise DecodeError(f"empty image: {width}x{height}")
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except _PIL_ERRORS:
        orientation = 1  # unreadable EXIF: keep the stored orientation
    if orientation in _SWAPS_AXES:
        width, height = height, width
    if dynamic is not None and (why := aspect_error(height, width)) is not None:
        raise DecodeError(f"image {why}")
    if im.format in ("JPEG", "MPO") and pinpoints is None and dynamic is None:  # anyres and dynamic resolution
        im.draft(im.mode, (image_size, image_size))  # read full resolution, as the reference does; DCT scaling: >= S
    try:
        im.load()
        im = ImageOps.exif_transpose(im) if orientation != 1 else im
        rgb = _to_rgb(im)
        if dynamic is not None:
            frames = image_input(rgb, dynamic)
        elif pinpoints:
            frames = anyres_tiles(np.asarray(rgb), pinpoints, image_size)
        else:
            frames = to_model_input(rgb, image_size)[None]
    except Image.DecompressionBombError as err:
        raise DecodeError(f"image too large: {err}") from err
    except _PIL_ERRORS as err:
        if "truncated" in str(err) or isinstance(err, EOFError):
            raise DecodeError(f"truncated image: {err}") from err
        raise DecodeError(f"corrupt image: {type(err).__name__}: {err}") from err
    return DecodedImage(frames=frames, width=width, height=height)
