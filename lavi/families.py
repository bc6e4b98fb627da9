"""The model families the engine serves, and the one place that maps a checkpoint to its family.

A family is one package under lavi/ (today `lavi.core`, a LaVi of this project's own, `lavi.onevision`, a Hugging
Face LLaVA-OneVision, and `lavi.qwenvl`, a Qwen2-VL, Qwen2.5-VL or Qwen3-VL). Each gives a torch-free `family.py` with:

- `claims(config)`: whether a config.json is one of its checkpoints;
- `describe(config, read, name)`: its `ModelInfo`, the name and input contract the decode workers must produce
  (a square size, anyres tiles, dynamic resolution), read from its config files only (`read(file)` -> dict or None), so the driver
  needs no torch;
- `load(path, device, dtype)`: the model, and `ENGINE`: its engine class, as "module:Class" (loaded on first use);
- `CONVERT`: its `convert` into a LaVi as "module:function", or None where it has none.

Every dispatch from a checkpoint to its code asks `family_of` (the engine's load, the driver's model info, convert,
train, distill, bench). Adding a family: a new package with its family.py, one entry in FAMILIES, its tests. A
checkpoint no family claims is refused in one line naming its model type and the families there are.

This module also holds the names a run may spell: the families, the fusions a LaVi is built with, and what
`train --fusion` takes. Torch-free.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from lavi.core.config import FUSIONS
from lavi.resolution import DynamicResolution

LAVI, LLAVA_OV, QWEN_VL = "lavi", "llava-ov", "qwen-vl"  # the families' names (LLAVA_OV is also train's --fusion)
TRAIN_FUSIONS = (*FUSIONS, LLAVA_OV)  # what `train --fusion` builds: a LaVi's fusions, or a LLaVA-OneVision


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with what to do about it."""


class UnknownFamily(CheckpointError):
    """A checkpoint that no family claims; the message names its model type and the families there are."""


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows of a model before any worker loads it: its name, the label the rows' fusion column
    carries, and its input contract."""

    name: str
    family: str
    fusion: str
    vision_in_context: bool  # its visual tokens enter the LLM's context (concat, LLaVA-OneVision), or not (a LaVi)
    image_size: int  # the square side frames (and anyres tiles) are cut to; with `dynamic`, not used for frames
    pinpoints: tuple[tuple[int, int], ...] | None = None  # anyres grid resolutions; None: square frames only
    default_frames: int = 8
    max_frames: int = 64
    default_prompts: dict[str, str] = field(default_factory=dict)
    # dynamic resolution (lavi.resolution): each image at its own size and a video's frames at one size per clip,
    # multiples of a factor between min and max pixels; None: square frames (or anyres tiles) of image_size
    dynamic: DynamicResolution | None = None
    # the `--visual-compress` methods it takes (lavi.visual_tokens.methods); None: every method where its vision is
    # in its context, none otherwise
    compress_methods: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field, nested dataclasses as dicts (`DynamicResolution.from_dict` reads `dynamic` back)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # how a refusal names it: "a LaVi checkpoint", "a LLaVA-OneVision (model_type 'llava_onevision')"
    module: str  # its torch-free family.py

    @property
    def spec(self) -> ModuleType:
        return importlib.import_module(self.module)

    def claims(self, config: dict[str, Any]) -> bool:
        return self.spec.claims(config)

    def describe(self, config: dict[str, Any], read: Callable[[str], dict | None], name: str) -> ModelInfo:
        return self.spec.describe(config, read, name)

    def load(self, path: str | Path, device: str = "cpu", dtype=None):
        return self.spec.load(path, device=device, dtype=dtype)

    @property
    def engine(self) -> type:
        return _resolve(self.spec.ENGINE)

    @property
    def convert(self) -> Callable | None:
        return _resolve(self.spec.CONVERT) if self.spec.CONVERT else None


FAMILIES = (Family(LAVI, "a LaVi checkpoint", "lavi.core.family"),
            Family(LLAVA_OV, "a LLaVA-OneVision (model_type 'llava_onevision')", "lavi.onevision.family"),
            Family(QWEN_VL, "a Qwen-VL (model_type 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl')", "lavi.qwenvl.family"))
NAMES = tuple(f.name for f in FAMILIES)


def family_of(config: dict[str, Any], where: str = "the checkpoint") -> Family:
    """The family whose checkpoint `config` (a config.json's contents) is; UnknownFamily otherwise."""
    for family in FAMILIES:
        if family.claims(config):
            return family
    raise UnknownFamily(f"{where} is a {config.get('model_type')!r} checkpoint; supported: "
                        + " or ".join(f.title for f in FAMILIES) + f" (the families {', '.join(NAMES)})")


def family_at(path: str | Path) -> Family:
    """The family of the local checkpoint directory `path`."""
    config = Path(path) / "config.json"
    if not config.exists():
        raise UnknownFamily(f"{path} is not a checkpoint directory (no config.json)")
    return family_of(json.loads(config.read_text()), str(path))


def load_model(path: str | Path, device: str = "cpu", dtype=None):
    """The model of any family's checkpoint directory."""
    return family_at(path).load(path, device=device, dtype=dtype)


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
