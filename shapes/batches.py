"""Training examples from the shapes-v1 renderer: mixed captioning + VQA over images and videos.

Each step's examples are a pure function of (seed, step), so a resumed run sees the same data.
To train for the spec and not for one renderer, edges are drawn hard or anti-aliased over a random
band, and images and frames pass through what the pipeline and other encoders do to them: JPEG at
random quality (which also subsamples chroma, as H.264 yuv420p does), and a mild blur now and then.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from lavi.training.collate import Example
from shapes import render, spec
from workers.video import frame_for, sample_times


@dataclass(frozen=True)
class ShapesData:
    seed: int = 0
    images: int = 24  # per step
    videos: int = 8
    questions: int = 3  # VQA pairs per item beside its caption
    frames: tuple[int, ...] = (4,)  # frames per video clip, drawn per example
    augment: bool = True
    grid: bool = False  # per-frame cell labels (Example.grid) for the training-only grid probe
    focus: bool = False  # per pair, the target spans about one object and its cells (Example.focus), for the focus loss
    stream: int = 0  # another stream of items for the same seed (the vision phase's items are not the main phase's)

    def __call__(self, step: int) -> list[Example]:
        rng = np.random.default_rng([self.seed, step, self.stream])
        out = [self._image(rng) for _ in range(self.images)]
        return out + [self._video(rng) for _ in range(self.videos)]

    def _pairs(self, rng: np.random.Generator, prompt: str, caption: str, qa) -> tuple[tuple[str, str], ...]:
        k = min(self.questions, len(qa))
        picked = [qa[i] for i in rng.choice(len(qa), size=k, replace=False)] if k else []
        return ((prompt, caption), *picked)

    def _example(self, frames: np.ndarray, pairs, placed, idx: list[int]) -> Example:
        grid = grid_labels(placed, idx) if self.grid else None
        focus = tuple(focus_spans(q, a, placed, idx) for q, a in pairs) if self.focus else None
        return Example(frames, pairs, grid, focus)

    def _ramp(self, rng: np.random.Generator) -> float:
        """Edge anti-aliasing, which the spec leaves open: hard edges (a plain polygon fill) or a 0.5-2 px ramp."""
        if not self.augment:
            return 1.0
        return 0.0 if rng.random() < 0.25 else float(rng.uniform(0.5, 2.0))

    def _image(self, rng: np.random.Generator) -> Example:
        item = render.sample_image(rng, ramp=self._ramp(rng))
        frame = self._augment(item.pixels, rng)[None]
        return self._example(frame, self._pairs(rng, spec.IMAGE_PROMPT, item.caption, item.qa), item.placed, [0])

    def _video(self, rng: np.random.Generator) -> Example:
        idx = sample_indices(spec.NUM_FRAMES, int(rng.choice(self.frames)))
        item = render.sample_video(rng, ramp=self._ramp(rng), draw=idx)  # only the frames the model is shown
        frames = np.stack([self._augment(f, rng) for f in item.frames])
        return self._example(frames, self._pairs(rng, spec.VIDEO_PROMPT, item.caption, item.qa), item.placed, idx)

    def _augment(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.augment:
            return pixels
        im = Image.fromarray(pixels)
        if rng.random() < 0.2:
            im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
        if rng.random() < 0.6:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(rng.integers(80, 97)))
            im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return np.asarray(im)


GRID_CLASSES = (1 + len(spec.COLOURS), 1 + len(spec.SHAPES), 1 + len(spec.SIZES))  # class 0: empty cell


OVERLAP = 0.15  # an object is in a cell that holds at least this fraction of its bounding box


def cell_overlaps(p, frame: int) -> np.ndarray:
    """(9,) the fraction of object p's bounding box in each cell at `frame`. An image's object lies in one cell
    (its centre's); a moving one straddles up to four, and every cell it covers shows part of it."""
    cx, cy = p.centres[min(frame, len(p.centres) - 1)]
    edges = np.arange(4) * spec.CELL_SIDE
    h = p.s / 2

    def spans(c: float) -> np.ndarray:  # (3,) length of [c - h, c + h] inside each cell row/column
        return np.clip(np.minimum(c + h, edges[1:]) - np.maximum(c - h, edges[:-1]), 0, None)

    return (spans(cy)[:, None] * spans(cx)[None, :]).flatten() / (p.s * p.s)


def grid_labels(placed, frame_indices: list[int]) -> np.ndarray:
    """(F, 9, 3) per-frame cell labels: (colour, shape, size) class of the object in the cell that frame
    (holding >= OVERLAP of its bounding box, so that every cell a moving object straddles must know the
    whole object), 0 for an empty cell, -100 (ignored) for a cell with only a sliver of one or parts of two."""
    out = np.zeros((len(frame_indices), 9, 3), dtype=np.int64)
    colours, shapes, sizes = list(spec.COLOURS), list(spec.SHAPES), list(spec.SIZES)
    for j, f in enumerate(frame_indices):
        cover = np.stack([cell_overlaps(p, f) for p in placed])  # (objects, 9)
        for cell in range(9):
            inside = np.flatnonzero(cover[:, cell] >= OVERLAP)
            if len(inside) == 1 and (cover[:, cell] > 0).sum() == 1:
                p = placed[inside[0]]
                out[j, cell] = (1 + colours.index(p.colour), 1 + shapes.index(p.shape), 1 + sizes.index(p.size))
            elif (cover[:, cell] > 0).any():
                out[j, cell] = -100
    return out


def focus_cells(question: str, placed, frame_indices: list[int]) -> np.ndarray | None:
    """(F, 9) bool: the cells, in each frame, of the objects `question` is about: all of them for "how many
    objects", those of the shape for "how many {shape}s", else the one object it names (by colour and shape,
    or by the only colour or shape it gives); None when there is none (a count of zero, an absent object)."""
    words = set(spec.tokenize_words(question))
    colours = words & set(spec.COLOURS)
    shapes = {w.removesuffix("s") for w in words} & set(spec.SHAPES)
    match = [p for p in placed if (not colours or p.colour in colours) and (not shapes or p.shape in shapes)]
    if not match or ("many" not in words and len(match) != 1):
        return None
    return np.logical_or.reduce([_cells(p, frame_indices) for p in match])


def focus_spans(prompt: str, target: str, placed, frame_indices: list[int]) -> tuple:
    """The spans of `target` about objects in `placed`, with their cells per frame (lavi.training.collate.Span): a
    caption's object phrases, each about its object (`placed` is in caption order); an answer, whole, about
    the objects its question is about (focus_cells); none for the rest."""
    if prompt in (spec.IMAGE_PROMPT, spec.VIDEO_PROMPT):
        spans, pos = [], 0
        for p in placed:
            phrase = (spec.image_phrase(p.colour, p.shape, p.size, p.cell) if p.motion is None
                      else spec.video_phrase(p.colour, p.shape, p.size, p.motion))
            start = target.index(phrase, pos)
            pos = start + len(phrase)
            spans.append((start, pos, _cells(p, frame_indices)))
        return tuple(spans)
    cells = focus_cells(prompt, placed, frame_indices)
    return () if cells is None else ((0, len(target), cells),)


def _cells(p, frame_indices: list[int]) -> np.ndarray:
    """(F, 9) bool: the cells object p is in (cell_overlaps >= OVERLAP), per frame."""
    return np.stack([cell_overlaps(p, f) >= OVERLAP for f in frame_indices])


def sample_indices(num_frames: int, f: int, fps: float = spec.FPS) -> list[int]:
    """The frames the pipeline's video decoder shows the model for one clip of `num_frames` (its rule, not a copy)."""
    starts = np.arange(num_frames) / fps
    return frame_for(starts, sample_times(0.0, num_frames / fps, f)).tolist()
