"""Write a shapes-v1 corpus (PNG/JPEG images, H.264 MP4 videos, manifest.jsonl) through fsspec.

Item i of kind k is rendered from numpy.random.default_rng([seed, k, i]), so any item can be
re-rendered alone and a corpus of N items is a prefix of one of N + 1.
"""

from __future__ import annotations

import argparse
import io
import json
import logging

import av
import fsspec
import numpy as np
from PIL import Image

from shapes import render, spec

log = logging.getLogger(__name__)
IMAGE_KIND, VIDEO_KIND = 0, 1


def encode_image(pixels: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """PNG or JPEG (quality 90-95), chosen by rng. Returns (bytes, extension)."""
    buf = io.BytesIO()
    if rng.random() < 0.5:
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue(), "png"
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(rng.integers(90, 96)))
    return buf.getvalue(), "jpg"


def encode_video(frames: np.ndarray, fps: int = spec.FPS) -> bytes:
    """H.264 yuv420p MP4 at fps; frames (T, H, W, 3) uint8 RGB."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "medium", "threads": "1"}  # one thread: same bytes every run
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _objects_json(item: render.ImageItem | render.VideoItem) -> list[dict]:
    out = []
    for p in item.placed:
        d = {"colour": p.colour, "shape": p.shape, "size": p.size, "cell": p.cell, "s": round(p.s, 3),
             "rgb": list(p.rgb), "centre": [round(v, 3) for v in p.centres[0]]}
        if p.motion is not None:
            d["motion"] = p.motion
            d["end_centre"] = [round(v, 3) for v in p.centres[-1]]
        out.append(d)
    return out


def _entry(uri: str, media_type: str, item: render.ImageItem | render.VideoItem) -> dict:
    return {
        "uri": uri, "media_type": media_type, "caption": item.caption,
        "questions": [q for q, _ in item.qa], "answers": [a for _, a in item.qa],
        "objects": _objects_json(item),
    }


def write_corpus(uri: str, num_images: int, num_videos: int, seed: int,
                 storage_options: dict | None = None) -> str:
    """Render and write the corpus under uri/images, uri/videos and uri/manifest.jsonl; returns the manifest URI."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    for sub in ("images", "videos"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    manifest = f"{root}/manifest.jsonl"
    total = num_images + num_videos
    with fs.open(manifest, "w") as out:
        for kind, count in ((IMAGE_KIND, num_images), (VIDEO_KIND, num_videos)):
            for i in range(count):
                rng = np.random.default_rng([seed, kind, i])
                if kind == IMAGE_KIND:
                    item = render.sample_image(rng)
                    data, ext = encode_image(item.pixels, rng)
                    path, media_type = f"{root}/images/{i:06d}.{ext}", "image"
                else:
                    item = render.sample_video(rng)
                    data, path, media_type = encode_video(item.frames), f"{root}/videos/{i:06d}.mp4", "video"
                fs.pipe_file(path, data)
                out.write(json.dumps(_entry(fs.unstrip_protocol(path), media_type, item)) + "\n")
                done = i + 1 + (num_images if kind == VIDEO_KIND else 0)
                if done % 1000 == 0 or done == total:
                    log.info("shapes corpus: %d / %d items written", done, total)
    return fs.unstrip_protocol(manifest)


def read_manifest(uri: str, storage_options: dict | None = None) -> list[dict]:
    """The manifest's entries, in order."""
    with fsspec.open(uri, "r", **(storage_options or {})) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a shapes-v1 corpus.")
    parser.add_argument("uri")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--videos", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(write_corpus(args.uri, args.images, args.videos, args.seed))


if __name__ == "__main__":
    main()
