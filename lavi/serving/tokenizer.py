"""The tokenizer of a checkpoint: tokenizer.json through `tokenizers`; special ids come from the model config."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"checkpoint file missing: {path} (the tokenizer of {d})")
        self.tok = HFTokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """add_special_tokens: apply tokenizer.json's post-processor (a BOS it adds, say), as a processor does."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the (start, end) characters of `text` it came from."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
