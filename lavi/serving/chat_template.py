"""A checkpoint's chat template: found where Hugging Face puts it, rendered as transformers renders it.

transformers compiles chat templates in a sandboxed jinja2 environment (trim_blocks, lstrip_blocks,
loopcontrols, a `{% generation %}` tag, `tojson` without HTML escaping, `raise_exception`, `strftime_now`).
This module does the same, so a prompt renders to the very string the checkpoint's processor would build.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # then tokenizer_config.json's "chat_template"


def find_template(directory: str | Path) -> str | None:
    """The chat template of a checkpoint directory: chat_template.jinja, chat_template.json (processor layout),
    or tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default")."""
    d = Path(directory)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        if (d / name).exists():
            value = json.loads((d / name).read_text()).get("chat_template")
            if isinstance(value, list):
                value = next((t["template"] for t in value if t.get("name") == "default"), None)
            if value:
                return value
    return None


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks assistant spans with it)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclass(frozen=True)
class Turns:
    """A prompt that continues a conversation: the earlier (user, assistant) turns, then this user turn's text.
    A training pair's prompt is a plain string (one user turn) or this; the image or video goes in the first
    user turn."""

    history: tuple[tuple[str, str], ...]
    text: str


Prompt = Union[str, Turns]


def as_turns(prompt: Prompt) -> Turns:
    return prompt if isinstance(prompt, Turns) else Turns((), prompt)


class ChatTemplate:
    """One compiled template. `render(prompt, media)` is one user turn: the image or video, then the text, and the
    generation prompt, as `processor.apply_chat_template(..., add_generation_prompt=True)` renders it; a `Turns`
    prompt renders its earlier turns first (the media in the first user turn)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.datetime.now().strftime(f))
        self.template = env.from_string(source)
        self.special_tokens = dict(special_tokens or {})

    def render(self, prompt: Prompt, media: str | None) -> str:
        turns = as_turns(prompt)
        messages = []
        for user, assistant in turns.history:
            messages += [_message("user", user, media if not messages else None), _message("assistant", assistant)]
        messages.append(_message("user", turns.text, media if not messages else None))
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)


def _message(role: str, text: str, media: str | None = None) -> dict:
    return {"role": role, "content": ([{"type": media}] if media else []) + [{"type": "text", "text": text}]}


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, the way transformers hands them to a template."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out
