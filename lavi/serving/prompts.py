"""How a LaVi checkpoint turns a prompt into ids: its own format (`prompt_template`, an optional BOS), or, for a
checkpoint converted from a chat model, one user turn of that model's chat template with no image in it (a
LaVi's vision never enters the context). The engine and training's collate both encode through here.

A LLaVA-OneVision's prompts are one user turn of its chat template with the image or video in it (`ChatPrompts`).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from lavi.serving.chat_template import ChatTemplate, Prompt, as_turns, find_template, special_tokens
from lavi.core.config import LaViConfig
from lavi.serving.tokenizer import Tokenizer


@lru_cache(maxsize=8)
def _template(source: str, tokens: tuple[tuple[str, str], ...]) -> ChatTemplate:
    return ChatTemplate(source, dict(tokens))


def prompt_ids(config: LaViConfig, tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """A LaVi's prompt ids. A `Turns` prompt's earlier turns come first: through the chat template, or, in the
    model's own format, each as its formatted prompt, then the answer and EOS, as the model would have made it."""
    if config.chat_template:
        chat = _template(config.chat_template, tuple(sorted(config.chat_tokens.items())))
        return tokenizer.encode(chat.render(prompt, None))
    turns = as_turns(prompt)
    ids = [config.bos_token_id] if config.bos_token_id is not None else []
    for user, assistant in turns.history:
        ids += tokenizer.encode(config.prompt_template.format(prompt=user)) + tokenizer.encode(assistant)
        ids.append(config.eos_token_id)
    return ids + tokenizer.encode(config.prompt_template.format(prompt=turns.text))


class ChatPrompts:
    """A chat checkpoint's prompts: one user turn of its template (the image or video, then the text, and the
    generation prompt), tokenised as its processor does: the tokenizer's own special tokens added unless the
    rendered turn already starts with BOS."""

    def __init__(self, chat: ChatTemplate, tokenizer: Tokenizer) -> None:
        self.chat, self.tokenizer = chat, tokenizer
        self.bos = chat.special_tokens.get("bos_token")

    @classmethod
    def load(cls, directory: str | Path, tokenizer: Tokenizer | None = None) -> "ChatPrompts":
        d = Path(directory)
        source = find_template(d)
        if source is None:
            raise ValueError(f"{d} has no chat template (chat_template.jinja, chat_template.json or "
                             "tokenizer_config.json's chat_template)")
        config = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
        return cls(ChatTemplate(source, special_tokens(config)), tokenizer or Tokenizer(d))

    def ids(self, prompt: Prompt, media: str | None) -> list[int]:
        rendered = self.chat.render(prompt, media)
        return self.tokenizer.encode(rendered, add_special_tokens=not (self.bos and rendered.startswith(self.bos)))
