"""How a LaVi checkpoint turns a prompt into ids: its own format (`prompt_template`, an optional BOS), or, for a
checkpoint converted from a chat model, one user turn of that model's chat template with no image in it (a
LaVi's vision never enters the context). The engine and training's collate both encode through here."""
from __future__ import annotations

from functools import lru_cache

from .chat import ChatTemplate
from .config import LaViConfig
from .tokenizer import Tokenizer


@lru_cache(maxsize=8)
def _template(source: str, tokens: tuple[tuple[str, str], ...]) -> ChatTemplate:
    return ChatTemplate(source, dict(tokens))


def prompt_ids(config: LaViConfig, tokenizer: Tokenizer, text: str) -> list[int]:
    if config.chat_template:
        chat = _template(config.chat_template, tuple(sorted(config.chat_tokens.items())))
        return tokenizer.encode(chat.render(text, None))
    ids = tokenizer.encode(config.prompt_template.format(prompt=text))
    return ([config.bos_token_id] if config.bos_token_id is not None else []) + ids
