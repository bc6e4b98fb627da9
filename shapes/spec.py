"""shapes-v1 constants, canonical text forms and the word-level vocabulary (SHAPES.md)."""

from __future__ import annotations

import re

VERSION = "shapes-v1"
IMAGE_SIZE = 128
CELL_SIDE = IMAGE_SIZE / 3  # 3 x 3 grid, cell index row-major from the top left
CENTRE_JITTER = 3.0  # px, uniform on each axis
BACKGROUND_RANGE = (200, 255)  # per channel, uniform
NOISE_SIGMA_MAX = 6.0
COLOUR_JITTER = 20  # per channel, uniform, then clipped to [0, 255]
MAX_IMAGE_OBJECTS = 3
MAX_VIDEO_OBJECTS = 2
NUM_FRAMES = 16
FPS = 8
MOTION_DISTANCE = (40.0, 56.0)  # 48 +- 8 px over the clip

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (14.0, 20.0), "large": (28.0, 34.0)}
CELL_WHERE = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
CELL_ANSWER = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
MOTIONS = ("left", "right", "up", "down", "still")
MOTION_PHRASE = {m: ("stays still" if m == "still" else f"moves {m}") for m in MOTIONS}
MOTION_VECTOR = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
NUMBER_WORDS = ("zero", "one", "two", "three")

IMAGE_PROMPT = "describe the image."
VIDEO_PROMPT = "describe the video."


# ---- canonical phrases and captions ----
def image_phrase(colour: str, shape: str, size: str, cell: int) -> str:
    return f"a {size} {colour} {shape} {CELL_WHERE[cell]}"


def video_phrase(colour: str, shape: str, size: str, motion: str) -> str:
    return f"a {size} {colour} {shape} {MOTION_PHRASE[motion]}"


def join_image_phrases(phrases: list[str]) -> str:
    """`P1.` / `P1 and P2.` / `P1, P2 and P3.` (phrases already in cell order)."""
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


def join_video_phrases(phrases: list[str]) -> str:
    return " and ".join(phrases) + "."


# ---- questions (answers are produced by shapes.render) ----
def q_count() -> str:
    return "how many objects are there?"


def q_count_shape(shape: str) -> str:
    return f"how many {shape}s are there?"


def q_colour_of_shape(shape: str) -> str:
    return f"what color is the {shape}?"


def q_shape_of_colour(colour: str) -> str:
    return f"what shape is the {colour} object?"


def q_where(colour: str, shape: str) -> str:
    return f"where is the {colour} {shape}?"


def q_exists(colour: str, shape: str) -> str:
    return f"is there a {colour} {shape}?"


def q_size(colour: str, shape: str) -> str:
    return f"is the {colour} {shape} small or large?"


def q_motion(colour: str, shape: str) -> str:
    return f"which way does the {colour} {shape} move?"


# ---- words ----
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]", re.IGNORECASE)


def tokenize_words(text: str) -> list[str]:
    """Split into words and single punctuation marks: "a b, c." -> ["a", "b", ",", "c", "."]."""
    return _WORD_RE.findall(text)


def detokenize(words: list[str]) -> str:
    """Inverse of tokenize_words for canonical text: spaces between words, none before , . ?"""
    out = ""
    for w in words:
        out += w if (not out or w in ",.?") else " " + w
    return out


def _all_texts() -> list[str]:
    texts = [IMAGE_PROMPT, VIDEO_PROMPT, q_count(), "yes", "no", "small", "large"]
    texts += list(NUMBER_WORDS) + list(CELL_ANSWER) + list(MOTIONS) + list(SHAPES) + list(COLOURS)
    texts += [join_image_phrases(["a", "a", "a"])]  # the joins: "," "and" "."
    for shape in SHAPES:
        texts += [q_count_shape(shape), q_colour_of_shape(shape)]
        for colour in COLOURS:
            texts += [q_shape_of_colour(colour), q_where(colour, shape), q_exists(colour, shape),
                      q_size(colour, shape), q_motion(colour, shape)]
            for size in SIZES:
                texts += [image_phrase(colour, shape, size, c) for c in range(9)]
                texts += [video_phrase(colour, shape, size, m) for m in MOTIONS]
    return texts


def vocabulary() -> list[str]:
    """Every word and punctuation token of any shapes-v1 prompt, question, caption or answer, sorted."""
    return sorted({w for t in _all_texts() for w in tokenize_words(t)})
