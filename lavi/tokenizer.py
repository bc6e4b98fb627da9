"""The tokenizer of a checkpoint: tokenizer.json through `tokenizers`, special ids from the config."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"checkpoint file missing: {path} (the tokenizer of {d})")
        self.tok = HFTokenizer.from_file(str(path))
        cfg_path = d / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def special_id(self, key: str) -> int | None:
        """The id of `eos_token` / `bos_token` / `pad_token` named in tokenizer_config.json."""
        tok = self.config.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.tok.token_to_id(tok) if tok else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the (start, end) characters of `text` it came from."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()
