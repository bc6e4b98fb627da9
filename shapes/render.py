"""Seeded rendering of shapes-v1 images and videos (numpy only), with captions and QA.

Coordinates are continuous pixels: pixel (row i, col j) covers [j, j+1) x [i, i+1), centre (j+.5, i+.5).
Edges are anti-aliased with a ramp on the signed distance to the outline: 1 px by default, 0 for hard edges.
An object's cell is that of its centre (first-frame centre for videos): column = min(floor(x / (128/3)), 2),
likewise the row; a centre exactly on a border goes to the lower-right cell. Video objects that share a
first-frame cell are ordered by that centre's y, then x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shapes import spec

S = spec.IMAGE_SIZE


@dataclass(frozen=True)
class Placed:
    """One drawn object: what it is and where. `centres` has one (x, y) per frame (one for images)."""
    colour: str
    shape: str
    size: str
    s: float  # diameter / side / base and height, px
    rgb: tuple[int, int, int]
    centres: tuple[tuple[float, float], ...]
    motion: str | None = None  # videos only

    @property
    def cell(self) -> int:
        return cell_of(*self.centres[0])


@dataclass(frozen=True)
class ImageItem:
    pixels: np.ndarray  # (128, 128, 3) uint8
    objects: tuple[tuple[str, str, str, int], ...]  # (colour, shape, size, cell), in cell order
    caption: str
    qa: tuple[tuple[str, str], ...]
    placed: tuple[Placed, ...]
    background: tuple[int, int, int]
    noise_sigma: float


@dataclass(frozen=True)
class VideoItem:
    frames: np.ndarray  # (T, 128, 128, 3) uint8
    objects: tuple[tuple[str, str, str, str, int], ...]  # (colour, shape, size, motion, first-frame cell)
    caption: str
    qa: tuple[tuple[str, str], ...]
    placed: tuple[Placed, ...]
    background: tuple[int, int, int]
    noise_sigma: float


def cell_of(x: float, y: float) -> int:
    col = min(max(int(x // spec.CELL_SIDE), 0), 2)
    row = min(max(int(y // spec.CELL_SIDE), 0), 2)
    return row * 3 + col


# ---- drawing ----
def _coverage(shape: str, s: float, cx: float, cy: float, ramp: float = 1.0) -> tuple[slice, slice, np.ndarray]:
    """Coverage in [0, 1] of one shape over its bounding box (clipped to the image), anti-aliased over a
    `ramp` px wide band of the signed distance (0: hard edges, as a plain polygon fill draws them)."""
    h = s / 2
    x0, x1 = max(int(cx - h - 1), 0), min(int(math.ceil(cx + h + 1)), S)
    y0, y1 = max(int(cy - h - 1), 0), min(int(math.ceil(cy + h + 1)), S)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]  # (1, W)
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]  # (H, 1)
    if shape == "circle":
        inside = h - np.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        inside = np.minimum(h - np.abs(dx), h - np.abs(dy))
    else:  # triangle, apex up: apex (cx, cy - h), base y = cy + h from cx - h to cx + h
        side = ((dy + h) / 2 - np.abs(dx)) * (2 / math.sqrt(5))  # distance to the slanted edges
        inside = np.minimum(h - dy, side)
    cov = (inside > 0).astype(np.float32) if ramp <= 0 else np.clip(inside / ramp + 0.5, 0.0, 1.0)
    return slice(y0, y1), slice(x0, x1), cov[..., None]


def _draw(canvas: np.ndarray, p: Placed, frame: int = 0, ramp: float = 1.0) -> None:
    ys, xs, cov = _coverage(p.shape, p.s, *p.centres[frame], ramp)
    region = canvas[ys, xs]
    region += (np.asarray(p.rgb, np.float32) - region) * cov


def _background(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int], float]:
    lo, hi = spec.BACKGROUND_RANGE
    bg = tuple(int(v) for v in rng.integers(lo, hi + 1, 3))
    sigma = 0.0 if rng.random() < 0.25 else float(rng.uniform(0, spec.NOISE_SIGMA_MAX))
    canvas = np.empty((S, S, 3), np.float32)
    canvas[:] = bg
    if sigma > 0:
        canvas += rng.standard_normal((S, S, 3), dtype=np.float32) * sigma
        np.clip(canvas, lo, hi, out=canvas)  # the background stays in [200, 255]
    return canvas, bg, sigma


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def _sample_kinds(rng: np.random.Generator, n: int) -> list[tuple[str, str, str, float, tuple[int, int, int]]]:
    """n objects with distinct (colour, shape): (colour, shape, size, s, rgb)."""
    combos = [(c, sh) for c in spec.COLOURS for sh in spec.SHAPES]
    out = []
    for k in rng.choice(len(combos), n, replace=False):
        colour, shape = combos[k]
        size = tuple(spec.SIZES)[int(rng.integers(len(spec.SIZES)))]
        s = float(rng.uniform(*spec.SIZES[size]))
        base = np.asarray(spec.COLOURS[colour])
        rgb = np.clip(base + rng.integers(-spec.COLOUR_JITTER, spec.COLOUR_JITTER + 1, 3), 0, 255)
        out.append((colour, shape, size, s, tuple(int(v) for v in rgb)))
    return out


# ---- questions ----
def _image_qa(rng: np.random.Generator, objs: list[Placed]) -> list[tuple[str, str]]:
    words = spec.NUMBER_WORDS
    qa = [(spec.q_count(), words[len(objs)])]
    qa += [(spec.q_count_shape(sh), words[sum(o.shape == sh for o in objs)]) for sh in spec.SHAPES]
    for sh in spec.SHAPES:
        match = [o for o in objs if o.shape == sh]
        if len(match) == 1:
            qa.append((spec.q_colour_of_shape(sh), match[0].colour))
    for c in spec.COLOURS:
        match = [o for o in objs if o.colour == c]
        if len(match) == 1:
            qa.append((spec.q_shape_of_colour(c), match[0].shape))
    qa += [(spec.q_where(o.colour, o.shape), spec.CELL_ANSWER[o.cell]) for o in objs]
    present = {(o.colour, o.shape) for o in objs}
    absent = [(c, sh) for c in spec.COLOURS for sh in spec.SHAPES if (c, sh) not in present]
    exists = [(spec.q_exists(c, sh), "yes") for c, sh in sorted(present)]
    exists += [(spec.q_exists(*absent[k]), "no") for k in rng.choice(len(absent), len(objs), replace=False)]
    qa += [exists[k] for k in rng.permutation(len(exists))]
    qa += [(spec.q_size(o.colour, o.shape), o.size) for o in objs]
    return qa


# ---- images ----
def sample_image(rng: np.random.Generator, ramp: float = 1.0) -> ImageItem:
    """One shapes-v1 image: 1-3 objects in distinct cells, caption in canonical form, all QA. `ramp`: the
    anti-aliasing band in px (the spec leaves edges open; training varies it)."""
    canvas, bg, sigma = _background(rng)
    n = int(rng.integers(1, spec.MAX_IMAGE_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(9, n, replace=False))
    objs = []
    for cell, (colour, shape, size, s, rgb) in zip(cells, _sample_kinds(rng, n)):
        jx, jy = rng.uniform(-spec.CENTRE_JITTER, spec.CENTRE_JITTER, 2)
        cx = (cell % 3 + 0.5) * spec.CELL_SIDE + float(jx)
        cy = (cell // 3 + 0.5) * spec.CELL_SIDE + float(jy)
        objs.append(Placed(colour, shape, size, s, rgb, ((cx, cy),)))
    for p in objs:
        _draw(canvas, p, ramp=ramp)
    caption = spec.join_image_phrases([spec.image_phrase(o.colour, o.shape, o.size, o.cell) for o in objs])
    return ImageItem(
        pixels=_to_uint8(canvas),
        objects=tuple((o.colour, o.shape, o.size, o.cell) for o in objs),
        caption=caption, qa=tuple(_image_qa(rng, objs)), placed=tuple(objs), background=bg, noise_sigma=sigma,
    )


# ---- videos ----
def _boxes_apart(a: Placed, b: Placed, gap: float = 1.0) -> bool:
    """True if the two objects' bounding boxes (plus the anti-aliasing ramp) are disjoint in every frame."""
    r = (a.s + b.s) / 2 + gap
    return all(abs(pa[0] - pb[0]) >= r or abs(pa[1] - pb[1]) >= r for pa, pb in zip(a.centres, b.centres))


def _sample_path(rng: np.random.Generator, s: float, motion: str, num_frames: int) -> tuple[tuple[float, float], ...]:
    """Straight path at constant speed, fully inside the frame (1 px margin for the ramp)."""
    dist = 0.0 if motion == "still" else float(rng.uniform(*spec.MOTION_DISTANCE))
    ux, uy = spec.MOTION_VECTOR[motion]
    lo, hi = s / 2 + 1, S - s / 2 - 1
    # start so that start + u * dist stays in [lo, hi] on both axes
    x0 = float(rng.uniform(lo + max(-ux, 0) * dist, hi - max(ux, 0) * dist))
    y0 = float(rng.uniform(lo + max(-uy, 0) * dist, hi - max(uy, 0) * dist))
    steps = [t / (num_frames - 1) for t in range(num_frames)]
    return tuple((x0 + ux * dist * f, y0 + uy * dist * f) for f in steps)


def sample_video(rng: np.random.Generator, num_frames: int = spec.NUM_FRAMES, ramp: float = 1.0,
                 draw: list[int] | None = None) -> VideoItem:
    """One shapes-v1 video: 1-2 moving or still objects that stay inside and never overlap (`ramp` as for
    sample_image). `draw`: render only these frame indices (`frames` then holds them in that order; the
    objects, paths, caption and answers are those of the whole clip)."""
    canvas, bg, sigma = _background(rng)
    n = int(rng.integers(1, spec.MAX_VIDEO_OBJECTS + 1))
    objs: list[Placed] = []
    for colour, shape, size, s, rgb in _sample_kinds(rng, n):
        while True:  # rejection: a free path exists for any pair (two large objects fill < 1/2 of a side)
            motion = spec.MOTIONS[int(rng.integers(len(spec.MOTIONS)))]
            p = Placed(colour, shape, size, s, rgb, _sample_path(rng, s, motion, num_frames), motion)
            if all(_boxes_apart(p, q) for q in objs):
                break
        objs.append(p)
    objs.sort(key=lambda o: (o.cell, o.centres[0][1], o.centres[0][0]))
    draw = list(range(num_frames)) if draw is None else draw
    frames = np.empty((len(draw), S, S, 3), np.uint8)
    for i, t in enumerate(draw):
        frame = canvas.copy()
        for p in objs:
            _draw(frame, p, t, ramp)
        frames[i] = _to_uint8(frame)
    caption = spec.join_video_phrases([spec.video_phrase(o.colour, o.shape, o.size, o.motion) for o in objs])
    qa = [(spec.q_count(), spec.NUMBER_WORDS[n])]
    qa += [(spec.q_motion(o.colour, o.shape), o.motion) for o in objs]
    return VideoItem(
        frames=frames, objects=tuple((o.colour, o.shape, o.size, o.motion, o.cell) for o in objs),
        caption=caption, qa=tuple(qa), placed=tuple(objs), background=bg, noise_sigma=sigma,
    )
