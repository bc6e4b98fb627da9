"""A prompt's constraint: its answer is one of a set of choices, or JSON that validates against a JSON schema.

This is the contract (it travels with a prompt as JSON text, see `PROMPT_TYPE`) and the check of a finished text;
the token masks that make a model keep it are in lavi.serving.constrain. No torch here: the driver validates run options
with it, and refuses a run's constraint that the model's vocabulary can never meet (`vocabulary_gap`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence


class ConstraintError(ValueError):
    """A constraint that is malformed, or that this model's vocabulary cannot meet."""


@dataclass(frozen=True)
class Constraint:
    """One of `choices`, or JSON valid under `json_schema` (its canonical JSON text). Travels with a prompt as the
    JSON string `to_json` writes (`{"choices": [...]}` or `{"json_schema": {...}}`)."""

    choices: tuple[str, ...] = ()
    json_schema: str | None = None

    def __post_init__(self) -> None:
        if bool(self.choices) == (self.json_schema is not None):
            raise ConstraintError("a constraint is either choices or a JSON schema, not both and not neither")
        if self.choices:
            object.__setattr__(self, "choices", tuple(self.choices))
            if any(not isinstance(c, str) or not c.strip() for c in self.choices):
                raise ConstraintError(f"choices must be non-empty strings, got {list(self.choices)!r}")
        else:
            schema = _schema(self.json_schema)
            object.__setattr__(self, "json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def of(cls, choices: Sequence[str] | None = None, json_schema: Any = None) -> "Constraint | None":
        """None when neither is given. `json_schema`: a dict or its JSON text."""
        if not choices and json_schema is None:
            return None
        if json_schema is not None and not isinstance(json_schema, str):
            json_schema = json.dumps(json_schema)
        return cls(tuple(choices or ()), json_schema)

    @classmethod
    def parse(cls, text: str | None) -> "Constraint | None":
        """The constraint a prompt carries (`to_json`'s string), or None."""
        if text is None:
            return None
        spec = json.loads(text)
        unknown = set(spec) - {"choices", "json_schema"}
        if unknown:
            raise ConstraintError(f"unknown constraint keys {sorted(unknown)}: expected choices or json_schema")
        return cls.of(spec.get("choices"), spec.get("json_schema"))

    def to_json(self) -> str:
        if self.choices:
            return json.dumps({"choices": list(self.choices)}, ensure_ascii=False)
        return json.dumps({"json_schema": json.loads(self.json_schema)}, ensure_ascii=False, sort_keys=True)

    @property
    def schema(self) -> dict:
        return json.loads(self.json_schema) if self.json_schema is not None else {}

    def check(self, text: str, spelled: Sequence[str] = ()) -> str | None:
        """None when `text` meets the constraint, else why not. `spelled`: the choices as the model's tokenizer
        writes them back (a word-level decoder's spacing), also accepted."""
        if self.choices:
            if text.strip() in set(self.choices) | set(spelled):
                return None
            return f"{text[:80]!r} is not one of the choices {list(self.choices)!r}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            return f"not JSON ({err})"
        import jsonschema

        try:
            jsonschema.validate(value, self.schema)
        except jsonschema.ValidationError as err:
            return f"JSON does not validate against the schema: {err.message}"
        return None


def is_word_level(tokenizer: Any) -> bool:
    """Whether `tokenizer` (a `tokenizers.Tokenizer`: a checkpoint's tokenizer.json) is word level, as tiny-shapes':
    its tokens are whole words, which its decoder joins with spaces, so it can spell only text made of them."""
    return json.loads(tokenizer.to_str()).get("model", {}).get("type") == "WordLevel"


def missing_words(tokenizer: Any, choice: str) -> list[str]:
    """The words of `choice` a word-level `tokenizer` has no token for (each would come out as its unknown token);
    all of `choice` when it makes no token at all."""
    enc = tokenizer.encode(choice, add_special_tokens=False)
    unknown = [choice[a:b] for (a, b), t in zip(enc.offsets, enc.tokens) if choice[a:b] != t]
    return unknown or ([] if enc.ids else [choice])


WORD_LEVEL_JSON = ("a JSON schema needs a tokenizer that can spell JSON (a byte-level BPE, as LLaVA-OneVision's): this "
                   "model's is word level, whose decoder puts a space around every word and mark, inside JSON strings "
                   "too")


def vocabulary_gap(constraint: Constraint, tokenizer: Any) -> str | None:
    """Why a model whose tokenizer is `tokenizer` (a `tokenizers.Tokenizer`) can never meet `constraint`, or None.

    The one decision of it, torch-free: the driver refuses a run's --choices/--json-schema with it before listing
    anything (a run whose every row would be an error), and the engine's vocabulary (lavi.serving.constrain) a row's
    own. Only a word-level vocabulary is limited: a byte-level BPE spells any text, and what a JSON schema allows is
    left to llguidance's compiler."""
    if not is_word_level(tokenizer):
        return None
    if constraint.json_schema is not None:
        return WORD_LEVEL_JSON
    gaps = {choice: missing_words(tokenizer, choice) for choice in constraint.choices}
    bad = [choice for choice, words in gaps.items() if words]
    if not bad:
        return None
    words = list(dict.fromkeys(w for choice in bad for w in gaps[choice]))
    named = ", ".join(map(repr, bad))
    return (f"choice {named} has words this model's vocabulary lacks: {words}" if len(bad) == 1 else
            f"choices {named} have words this model's vocabulary lacks: {words}")


def _schema(text: str | None) -> dict:
    try:
        schema = json.loads(text or "")
    except json.JSONDecodeError as err:
        raise ConstraintError(f"the JSON schema is not JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ConstraintError(f"not a valid JSON schema: {err.message}") from None
    return schema
