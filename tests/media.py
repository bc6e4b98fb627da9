"""Builds test media in memory or under a tmp dir: valid files in unusual modes and bad ones.

Also holds the test-only decoder functions (hang, crash) that tests pass to the isolated
runner: they live here, importable by the spawned child, and never in the product path.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def image_bytes(im: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def jpeg(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    return image_bytes(Image.fromarray(noise_rgb(w, h, seed)), "JPEG", quality=90)


def png(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    return image_bytes(Image.fromarray(noise_rgb(w, h, seed)), "PNG")


def exif_rotated_jpeg(w: int = 80, h: int = 40, orientation: int = 6) -> bytes:
    """Stored w x h; EXIF orientation 6 says 'rotate 90 degrees', so upright it is h x w."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(Image.fromarray(noise_rgb(w, h)), "JPEG", exif=exif.tobytes())


def unusual_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (bytes, upright (width, height)) for valid images in awkward modes."""
    rgb = Image.fromarray(noise_rgb(40, 30))
    grey16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    frames = [Image.new("P", (32, 24), i) for i in range(3)]
    anim = io.BytesIO()
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "grey.png": (image_bytes(rgb.convert("L"), "PNG"), (40, 30)),
        "grey_alpha.png": (image_bytes(rgb.convert("LA"), "PNG"), (40, 30)),
        "rgba.png": (image_bytes(rgb.convert("RGBA"), "PNG"), (40, 30)),
        "palette.png": (image_bytes(rgb.convert("P"), "PNG"), (40, 30)),
        "grey16.png": (image_bytes(grey16, "PNG"), (40, 30)),
        "cmyk.jpg": (image_bytes(rgb.convert("CMYK"), "JPEG"), (40, 30)),
        "bilevel.png": (image_bytes(rgb.convert("1"), "PNG"), (40, 30)),
        "bilevel.tiff": (image_bytes(rgb.convert("1"), "TIFF"), (40, 30)),
        "animated.gif": (anim.getvalue(), (32, 24)),
        "photo.webp": (image_bytes(rgb, "WEBP"), (40, 30)),
        "photo.bmp": (image_bytes(rgb, "BMP"), (40, 30)),
        "rotated.jpg": (exif_rotated_jpeg(80, 40), (40, 80)),
        "one_pixel.png": (image_bytes(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), (1, 1)),
        "very_wide.png": (image_bytes(Image.fromarray(noise_rgb(4000, 3)), "PNG"), (4000, 3)),
    }


def png_bomb(side: int = 100_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes that declares side x side pixels:
    decoding it would need side*side bytes (10 GB at the default side)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    row = b"\x00" + b"\x00" * side
    comp = zlib.compressobj(9)
    idat = comp.compress(row * 16) + comp.flush()  # only 16 rows: the file stays tiny
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def mp4(path: Path, seconds: float = 2.0, fps: int = 8, size: int = 64, faststart: bool = True,
        height: int | None = None) -> bytes:
    """An H.264 MP4 whose frame i is filled with grey level 2*i mod 256 plus noise, size x size (or size wide and
    `height` high).

    faststart puts the index (moov) first, so a truncated copy keeps its index and the
    frames before the cut are recoverable. Written to `path` (faststart needs a real file)."""
    import av

    n = int(round(seconds * fps))
    rng = np.random.default_rng(0)
    opts = {"movflags": "faststart"} if faststart else {}
    height = height or size
    with av.open(str(path), mode="w", format="mp4", options=opts) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = size, height
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            level = np.full((height, size, 3), (2 * i) % 256, np.int16)
            pixels = np.clip(level + rng.integers(-8, 9, level.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def long_mp4(path: Path, seconds: float, fps: int = 4, size: int = 64, gop: int = 8, pad_bytes_per_s: int = 0,
             faststart: bool = False) -> int:
    """An H.264 MP4 whose frame i is grey level 2*i mod 256 (no noise: it compresses well), a keyframe every `gop`
    frames, with an interleaved stereo PCM track of noise at pad_bytes_per_s (rounded to whole samples) that makes
    the file as big as wanted without costing an encode (the audio is never decoded, only read past, as a film's
    audio is). Written to `path` one second at a time (memory stays small); returns its size."""
    import av

    rng = np.random.default_rng(0)
    samples = pad_bytes_per_s // 4  # s16 stereo: 4 bytes a sample
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=opts) as out:
        video = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(gop),
                                                             "keyint_min": str(gop), "sc_threshold": "0"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = out.add_stream("pcm_s16le", rate=samples, layout="stereo") if samples else None
        for s in range(int(np.ceil(seconds))):
            for k in range(fps):
                i = s * fps + k
                if i >= round(seconds * fps):
                    break
                pixels = np.full((size, size, 3), (2 * i) % 256, np.uint8)
                for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    out.mux(packet)
            if audio is not None:
                noise = rng.integers(-32768, 32768, (1, 2 * samples), dtype=np.int16)
                frame = av.AudioFrame.from_ndarray(noise, format="s16", layout="stereo")
                frame.sample_rate, frame.pts = samples, s * samples
                for packet in audio.encode(frame):
                    out.mux(packet)
        for stream in [s for s in (video, audio) if s is not None]:
            for packet in stream.encode():  # flush
                out.mux(packet)
    return path.stat().st_size


SCENE_COLOURS = [(230, 40, 40), (20, 20, 20), (40, 230, 240), (250, 250, 250), (30, 40, 200), (240, 200, 30)]


def scenes_mp4(path: Path, cuts: list[float], seconds: float, fps: int = 10, size: int = 64) -> bytes:
    """An H.264 MP4 of solid scenes (SCENE_COLOURS in turn, each far from the last in hue or brightness) changing
    at `cuts` (seconds, on frame starts), with a small white block moving inside each scene (motion is no cut)."""
    import av

    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(round(seconds * fps)):
            scene = sum(i / fps >= c - 1e-9 for c in cuts)
            pixels = np.empty((size, size, 3), np.uint8)
            pixels[:] = SCENE_COLOURS[scene % len(SCENE_COLOURS)]
            x = (3 * i) % (size - 8)
            pixels[4:10, x:x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the message its error row must hold) for images that cannot be labelled."""
    return {
        "empty.jpg": (b"", "empty file"),
        "notes named.jpg": (b"shopping list: eggs, milk\n", "not an image: cannot identify format"),
        "random.png": (np.random.default_rng(1).integers(0, 256, 5000, np.uint8).tobytes(), "not an image"),
        "truncated.jpg": (jpeg(200, 200)[:3000], "truncated image"),
        "truncated.png": (png(200, 200)[:3000], "truncated image"),
        "bomb.png": (png_bomb(100_000), "image too large"),  # PIL's own limit fires at open
        "bomb9k.png": (png_bomb(9_000), "over the limit of 67108864"),  # ours, from the header
    }


def bad_videos(tmp: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the message its error row must hold) for videos that cannot be labelled."""
    no_index = mp4(tmp / "slow.mp4", seconds=2, faststart=False)[:3000]  # moov at the end: gone
    return {
        "empty.mp4": (b"", "empty file"),
        "random.mp4": (np.random.default_rng(2).integers(0, 256, 5000, np.uint8).tobytes(), "not a video"),
        "text.mp4": (b"hello this is text, not a video\n" * 10, "not a video"),
        "cut.mp4": (no_index, "moov atom not found"),
        "mystery.bin": (b"\x00\x01\x02 not anything", "unrecognised media"),
    }


def write(path: Path, data: bytes) -> str:
    """Write bytes to path (creating folders) and return its file:// uri, as fsspec lists it
    (not Path.as_uri(): fsspec does not undo percent-encoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"file://{path}"


# test-only decoders for the isolated runner (module-level so the spawned child can import them)


def sleep_forever(*_args) -> None:
    time.sleep(3600)


def segfault(*_args) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def echo(*args):
    return args


def raise_value_error(*_args) -> None:
    raise ValueError("a programmer error in the decoder")


def hang_or_crash_by_name(item: dict, settings, data: bytes) -> list[dict]:
    """decode_item, except items whose uri contains 'HANG' sleep and 'CRASH' segfault."""
    from workers.decode import decode_item

    if "HANG" in item["uri"]:
        time.sleep(3600)
    if "CRASH" in item["uri"]:
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_item(item, settings, data)
