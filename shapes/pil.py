"""A second, independent renderer of shared/SHAPES.md (`lavi-label eval --renderer pil`): PIL's ImageDraw (hard edges, its own pixel
conventions, triangle and circle rasterisation), its own sampling code, and shapes.corpus's encoders and
manifest format. It checks that a model trained on shapes.render is scored on the spec, not on one renderer.
The text (captions, questions) is the spec's canonical form, from shapes.spec.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shapes import spec
from shapes.corpus import encode_image, encode_video

SIDE = 128 / 3


def _draw(im: Image.Image, shape: str, s: float, cx: float, cy: float, rgb: tuple[int, int, int]) -> None:
    d = ImageDraw.Draw(im)
    h = s / 2
    if shape == "circle":
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif shape == "square":
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    else:  # isosceles, apex up, base s, height s, centred on its bounding box
        d.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=rgb)


def _background(rng: np.random.Generator) -> tuple[tuple[int, int, int], float]:
    return tuple(int(v) for v in rng.integers(200, 256, 3)), float(rng.uniform(0, 6))


def _noisy(im: Image.Image, sigma: float, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(im).astype(np.float32) + rng.normal(0, sigma, (128, 128, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _kinds(rng: np.random.Generator, n: int) -> list[tuple[str, str, str, float, tuple[int, int, int]]]:
    pairs = [(c, sh) for c in spec.COLOURS for sh in spec.SHAPES]
    out = []
    for k in rng.permutation(len(pairs))[:n]:
        colour, shape = pairs[k]
        size = "small" if rng.random() < 0.5 else "large"
        lo, hi = spec.SIZES[size]
        rgb = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in spec.COLOURS[colour])
        out.append((colour, shape, size, float(rng.uniform(lo, hi)), rgb))
    return out


def image(rng: np.random.Generator) -> tuple[np.ndarray, str, list[tuple[str, str]]]:
    bg, sigma = _background(rng)
    im = Image.new("RGB", (128, 128), bg)
    n = int(rng.integers(1, 4))
    cells = sorted(rng.permutation(9)[:n].tolist())
    objs = []
    for cell, (colour, shape, size, s, rgb) in zip(cells, _kinds(rng, n)):
        cx = (cell % 3 + 0.5) * SIDE + rng.uniform(-3, 3)
        cy = (cell // 3 + 0.5) * SIDE + rng.uniform(-3, 3)
        _draw(im, shape, s, cx, cy, rgb)
        objs.append((colour, shape, size, cell))
    caption = spec.join_image_phrases([spec.image_phrase(c, sh, sz, cell) for c, sh, sz, cell in objs])
    qa = [(spec.q_count(), spec.NUMBER_WORDS[n])]
    for c, sh, sz, cell in objs:
        qa += [(spec.q_where(c, sh), spec.CELL_ANSWER[cell]), (spec.q_size(c, sh), sz), (spec.q_exists(c, sh), "yes")]
    absent = [(c, sh) for c in spec.COLOURS for sh in spec.SHAPES if all((c, sh) != o[:2] for o in objs)]
    qa.append((spec.q_exists(*absent[int(rng.integers(len(absent)))]), "no"))
    return _noisy(im, sigma, rng), caption, qa


def video(rng: np.random.Generator) -> tuple[np.ndarray, str, list[tuple[str, str]]]:
    bg, sigma = _background(rng)
    noise = rng.normal(0, sigma, (128, 128, 3))
    n = int(rng.integers(1, 3))
    paths = []
    for colour, shape, size, s, rgb in _kinds(rng, n):
        while True:
            motion = spec.MOTIONS[int(rng.integers(5))]
            ux, uy = spec.MOTION_VECTOR[motion]
            dist = 0.0 if motion == "still" else float(rng.uniform(40, 56))
            lo, hi = s / 2 + 1, 127 - s / 2
            x0 = rng.uniform(lo + max(-ux, 0) * dist, hi - max(ux, 0) * dist)
            y0 = rng.uniform(lo + max(-uy, 0) * dist, hi - max(uy, 0) * dist)
            track = [(x0 + ux * dist * t / 15, y0 + uy * dist * t / 15) for t in range(16)]
            if all(all(abs(a[0] - b[0]) > (s + q[3]) / 2 + 1 or abs(a[1] - b[1]) > (s + q[3]) / 2 + 1
                       for a, b in zip(track, q[5])) for q in paths):
                break
        paths.append((colour, shape, size, s, rgb, track, motion))
    paths.sort(key=lambda p: (min(int(p[5][0][1] // SIDE), 2) * 3 + min(int(p[5][0][0] // SIDE), 2),
                              p[5][0][1], p[5][0][0]))
    frames = []
    for t in range(16):
        im = Image.new("RGB", (128, 128), bg)
        for colour, shape, size, s, rgb, track, _ in paths:
            _draw(im, shape, s, *track[t], rgb)
        frames.append(np.clip(np.rint(np.asarray(im) + noise), 0, 255).astype(np.uint8))
    caption = spec.join_video_phrases([spec.video_phrase(c, sh, sz, m) for c, sh, sz, _, _, _, m in paths])
    qa = [(spec.q_count(), spec.NUMBER_WORDS[n])] + [(spec.q_motion(c, sh), m) for c, sh, _, _, _, _, m in paths]
    return np.stack(frames), caption, qa


def write(root: Path | str, images: int, videos: int, seed: int) -> str:
    """Files and a manifest.jsonl in shapes.corpus's format (uri, media_type, caption, questions, answers)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(images + videos):
        if i < images:
            pixels, caption, qa = image(rng)
            data, ext = encode_image(pixels, rng)
            path, kind = root / f"alt{i}.{ext}", "image"
        else:
            pixels, caption, qa = video(rng)
            data, path, kind = encode_video(pixels), root / f"alt{i}.mp4", "video"
        path.write_bytes(data)
        entries.append({"uri": str(path), "media_type": kind, "caption": caption,
                        "questions": [q for q, _ in qa], "answers": [a for _, a in qa]})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(manifest)
