"""Structured answers: a row's text constrained to one of a set of choices, or to JSON that validates against a
JSON schema, by masking the logits of every step to the tokens the constraint allows.

The token masks come from llguidance (guidance-ai). Why it and not xgrammar: its wheel depends on nothing (xgrammar
pulls torch, transformers and triton releases of its own, which would fight the CPU torch this project pins), it
takes any vocabulary as a list of token byte strings, so the project's word-level tokenizer works as well as a
byte-level BPE (Qwen2's, LLaVA-OneVision's), and it compiles JSON schemas and regular expressions lazily, computing
each row's mask on the CPU as generation goes, so no grammar is compiled ahead for a whole vocabulary.

How each kind of tokenizer is seen:
- byte-level BPE (and other tokenizers whose tokens are pieces of the text): llguidance reads tokenizer.json itself;
  the text is the concatenation of the tokens' bytes, as the decoder makes it.
- word level (`WordLevel` with a whitespace pre-tokenizer, as tiny-shapes'): the decoder writes the words with a
  space between them, so each token is seen as its word and one space; a choice is matched as the words the
  tokenizer makes of it. Such a vocabulary cannot spell JSON (every word and mark comes out with spaces around
  it, inside strings too), so a JSON schema is refused for it, by name.

Every finished constrained row is checked once more on its decoded text (`Constraint.check`: membership, or
json.loads plus jsonschema); a row that fails becomes an error row, so no `ok` row breaks its constraint.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from schemas.constraint import Constraint, ConstraintError, is_word_level, vocabulary_gap


# JSON as json.dumps writes it, whitespace nowhere else: free whitespace lets a weak model pad a row until it is
# cut off at max_new_tokens
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("structured answers (choices, a JSON schema) need the llguidance package: "
                              "pip install llguidance") from None
    return llguidance


def _regex_literal(text: str) -> str:
    """`text` as a regular expression (Rust regex syntax) that matches it exactly."""
    return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$#&-~/" else ch for ch in text)


class Vocabulary:
    """A model's tokens as llguidance sees them, built once per engine (a large BPE takes about a second).

    hf: the `tokenizers.Tokenizer` of the checkpoint; vocab_size: the logits' width (a model may have more rows than
    its tokenizer has tokens: those are never allowed); eos: the ids that end a row."""

    def __init__(self, hf, vocab_size: int, eos: Sequence[int]) -> None:
        llg = _llguidance()
        self.hf, self.vocab_size, self.eos = hf, vocab_size, tuple(eos)
        spec = json.loads(hf.to_str())
        self.word_level = is_word_level(hf)
        if self.word_level:
            self.words = {i: w for w, i in hf.get_vocab(with_added_tokens=True).items()}
            special = sorted({t["id"] for t in spec.get("added_tokens", []) if t.get("special")} | set(self.eos))
            self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_WordTokens(self, special)),
                                             n_vocab=vocab_size + 256, eos_token=list(self.eos))
        else:
            try:
                self.tokenizer = llg.LLTokenizer(hf.to_str(), n_vocab=vocab_size, eos_token=list(self.eos))
            except Exception as err:  # noqa: BLE001 - llguidance says what in the tokenizer it cannot read
                raise ConstraintError(f"llguidance cannot read this model's tokenizer.json: {err}") from None
        self._grammars: dict[Constraint, str] = {}

    def spelled(self, c: Constraint) -> tuple[str, ...]:
        """The choices as this model writes them back: decode(encode(choice))."""
        return tuple(self.hf.decode(self.hf.encode(ch, add_special_tokens=False).ids) for ch in c.choices)

    def grammar(self, c: Constraint) -> str:
        if c not in self._grammars:
            llg = _llguidance()
            gap = vocabulary_gap(c, self.hf)  # the driver refuses a run's constraint with the same decision
            if gap is not None:
                raise ConstraintError(gap)
            if c.choices:
                forms = [self._form(ch) for ch in c.choices]
                grammar = llg.LLMatcher.grammar_from_regex("(" + "|".join(map(_regex_literal, forms)) + ")")
            else:
                grammar = llg.LLMatcher.grammar_from_json_schema(c.json_schema, defaults=JSON_LAYOUT)
            error = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
            if error:
                raise ConstraintError(f"the constraint cannot be compiled: {error}")
            self._grammars[c] = grammar
        return self._grammars[c]

    def _form(self, choice: str) -> str:
        """The text the matcher must see for `choice`: itself, or for a word-level vocabulary its words each
        followed by a space (how `_WordTokens` spells them)."""
        if not self.word_level:
            return choice
        enc = self.hf.encode(choice, add_special_tokens=False)  # every word known: vocabulary_gap
        return "".join(w + " " for w in enc.tokens)

    def matcher(self, c: Constraint):
        m = _llguidance().LLMatcher(self.tokenizer, self.grammar(c), log_level=0)
        if m.is_error():
            raise ConstraintError(f"the constraint cannot be compiled: {m.get_error()}")
        return m


class _WordTokens:
    """A word-level vocabulary for llguidance.TokenizerWrapper: each word as its bytes and one space (the decoder
    joins words with spaces); special tokens as themselves, flagged special (never text). After the model's ids
    come 256 one-byte tokens the model does not have (its logits stop before them, so they are never taken):
    llguidance tokenizes what a grammar forces, which may end inside a word ("t" of "two" or "three")."""

    def __init__(self, vocab: Vocabulary, special: list[int]) -> None:
        self.hf, self.size = vocab.hf, vocab.vocab_size
        self.eos_token_id = vocab.eos[0]
        self.bos_token_id = None
        self.special_token_ids = special
        specials = set(special)
        self.tokens = [vocab.words.get(i, f"<unused{i}>").encode() + (b"" if i in specials else b" ")
                       for i in range(self.size)] + [bytes([b]) for b in range(256)]

    def __call__(self, text: bytes | str) -> list[int]:
        """Whole words (a space ends each) as their tokens, and what follows the last space as bytes."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        *words, rest = data.split(b" ")
        ids = []
        for word in words:
            enc = self.hf.encode(word.decode("utf-8", errors="replace"), add_special_tokens=False)
            if len(enc.ids) != 1 or enc.tokens[0].encode() != word:
                return ids + [self.size + b for b in b" ".join(words[len(ids):] + [rest])]
            ids.append(enc.ids[0])
        return ids + [self.size + b for b in rest]


class Guide:
    """The token masks of one generation call: request i follows `constraints[i]` (None: free). The generator asks
    `mask_` for the logits of the rows it samples (each row naming the request it serves, -1 for none) and tells
    `advance` the tokens they took. Free rows are never touched, so they generate as without a guide."""

    def __init__(self, vocab: Vocabulary, constraints: Sequence[Constraint | None]) -> None:
        self.vocab = vocab
        self.constraints = list(constraints)
        self.matchers = [vocab.matcher(c) if c is not None else None for c in self.constraints]
        self.stuck: dict[int, str] = {}  # requests whose constraint allowed no token (ended at EOS): why

    @classmethod
    def of(cls, vocab: Vocabulary | None, constraints: Sequence[Constraint | None] | None) -> "Guide | None":
        if not constraints or all(c is None for c in constraints):
            return None
        if vocab is None:
            raise ConstraintError("this engine has no vocabulary for constrained generation")
        return cls(vocab, constraints)

    def extend(self, constraints: Sequence[Constraint | None]) -> int:
        """Requests that join (an in-flight pool's next block): they are numbered from the returned index on."""
        start = len(self.constraints)
        self.constraints += list(constraints)
        self.matchers += [self.vocab.matcher(c) if c is not None else None for c in constraints]
        return start

    def mask_(self, logits: Tensor, reqs: Sequence[int]) -> None:
        """Set to -inf, in place, the logits (B, V) of the tokens each constrained row may not take next."""
        rows = [(b, self.matchers[r]) for b, r in enumerate(reqs) if r >= 0 and self.matchers[r] is not None]
        if not rows:
            return
        width = logits.shape[-1]
        words = (width + 31) // 32
        bits = np.stack([np.frombuffer(m.compute_bitmask(), np.uint32)[:words] for _, m in rows]).astype(np.int64)
        allowed = ((torch.from_numpy(bits)[:, :, None] >> torch.arange(32)) & 1).bool().flatten(1)[:, :width]
        for j, (b, m) in enumerate(rows):
            if m.is_error() or not bool(allowed[j].any()):  # nothing this model has is allowed: end the row there
                self.stuck.setdefault(reqs[b], m.get_error() or "no token of this model meets the constraint")
                allowed[j] = False
                allowed[j, list(self.vocab.eos)] = True
        index = torch.tensor([b for b, _ in rows], device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, reqs: Sequence[int], tokens: Sequence[int]) -> None:
        """Row b (serving request reqs[b], -1: none) took tokens[b]."""
        for r, t in zip(reqs, tokens):
            m = self.matchers[r] if r >= 0 else None
            if m is not None and not m.is_stopped() and not m.is_error():
                m.consume_token(t)

    def check(self, req: int, text: str) -> str | None:
        """None when request `req`'s finished text meets its constraint (or it has none), else why not."""
        c = self.constraints[req]
        if c is None:
            return None
        why = c.check(text, self.vocab.spelled(c))
        if why is not None and req in self.stuck:
            why = f"{why} (the constraint allowed no further token: {self.stuck[req][:200]})"
        return why
