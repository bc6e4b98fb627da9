"""What the driver knows of a model before any worker loads it: its name and input contract, from its config files.

The driver never loads torch for this: the decode stages need the input contract (the square size, anyres
pinpoints or dynamic resolution, frames per clip) and the output needs the model's name, and both are in config.json
(and preprocessor_config.json for a LLaVA-OneVision, the processor configs for dynamic resolution). A run's --choices or --json-schema is checked against its
vocabulary from tokenizer.json alone (`check_constraint`).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.storage import filesystem


def model_info(model: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """name, family, fusion, input contract (image_size, anyres pinpoints, dynamic resolution) and frames of a
    checkpoint, from its config files only (lavi.families.ModelInfo as a dict; `dynamic` a dict of
    lavi.resolution.DynamicResolution, or None). A checkpoint no family claims is refused by name."""
    from lavi.families import family_of

    fs, path = filesystem(model, storage_options)
    base = path.rstrip("/")
    if not fs.exists(f"{base}/config.json"):
        raise ValueError(f"--model {model!r} is not a checkpoint directory (no config.json)")

    def read(name: str) -> dict | None:
        return json.loads(fs.cat_file(f"{base}/{name}")) if fs.exists(f"{base}/{name}") else None

    config = read("config.json")
    family = family_of(config, f"--model {model!r}")
    return family.describe(config, read, base.rsplit("/", 1)[-1]).as_dict()


def check_constraint(model: str, name: str, constraint: str | None,
                     storage_options: dict[str, Any] | None = None) -> None:
    """Refuse (ValueError, one line) a run's constraint (schemas.constraint JSON) that the model `name` at `model`
    can never meet: a word-level vocabulary that lacks a choice's words, or cannot spell JSON; every row of such a
    run would be an infer error. Reads tokenizer.json only (through `tokenizers`), never the weights; the decision
    is schemas.constraint.vocabulary_gap, the engine's own. Without a tokenizer.json the engine refuses the model."""
    if constraint is None:
        return
    from tokenizers import Tokenizer

    from schemas.constraint import Constraint, vocabulary_gap

    fs, path = filesystem(model, storage_options)
    file = f"{path.rstrip('/')}/tokenizer.json"
    if not fs.exists(file):
        return
    c = Constraint.parse(constraint)
    gap = vocabulary_gap(c, Tokenizer.from_str(fs.cat_file(file).decode("utf-8")))
    if gap is not None:
        flag = "--choices" if c.choices else "--json-schema"
        raise ValueError(f"{flag}: model {name!r} ({model}) can never meet it, every row would be an error: {gap}; "
                         f"choose another {flag} or --model")
