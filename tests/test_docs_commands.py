"""Every `lavi-label ...` command shown in README.md and docs/*.md parses with the CLI's own parser.

Guards against docs that drift from the CLI: a flag renamed or removed, a value of the wrong type or
outside its choices, a subcommand that no longer exists. Nothing runs: each command is resolved down
its subcommand chain (`lavi-label bench model ...`) and parsed by click's `make_context`, which
converts every value; the command's callback is never called.

What counts as a command: a line of a fenced shell (or untagged) code block, with backslash-continued
lines joined and a leading `$ ` dropped, cut at `|`, `&&`, `||`, `;`, `&` into segments; a segment whose
first word, after `VAR=value` words, is `lavi-label`. A redirection (`>`, `<`) ends its segment.
Comment lines and trailing `# ...` comments are dropped. `export VAR=value` lines set the environment of
the block's later commands (a flag that falls back to an environment variable, such as `--address`, is
satisfied by them), and a `VAR=value` prefix sets it for its own command. Placeholders (DIR, JOB, ...)
are ordinary values. Paths need not exist: `click.Path(exists=True)` is relaxed for the parse, every
other check stays; so does every option callback, except that one reading a file named by its value
(`--json-schema FILE`) accepts a file that is not there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path

import click
import pytest

from jobs.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console", "zsh", "text"}
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", "|&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PROGRAM = "lavi-label"


@dataclasses.dataclass(frozen=True)
class DocCommand:
    path: str                  # relative to the repository root
    line: int                  # 1-based line of the command's first line
    argv: tuple[str, ...]      # the words after `lavi-label`
    env: tuple[tuple[str, str], ...]
    text: str                  # the command as shown (continuations joined)
    shell_error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _strip_comment(line: str) -> str:
    """Drop an unquoted `#` that starts a word, and what follows it (as a shell does)."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash-continued lines; each result keeps its first line's number."""
    out: list[tuple[int, str]] = []
    start, parts = None, []
    for number, raw in block:
        text = raw.strip()
        if start is None:
            if text.startswith("$ "):
                text = text[2:]
            start = number
        if text.endswith("\\"):
            parts.append(text[:-1].rstrip())
            continue
        parts.append(text)
        out.append((start, " ".join(p for p in parts if p)))
        start, parts = None, []
    if start is not None:
        out.append((start, " ".join(p for p in parts if p)))
    return out


def _segments(text: str) -> list[list[str]]:
    """Split a shell line into simple commands' words; a redirection ends its command."""
    text = re.sub(r"(?<=\s)\d+(?=[<>])", "", _strip_comment(text))   # the fd of `2>&1`, `2>err`
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    segments: list[list[str]] = [[]]
    redirected = False
    for token in lexer:
        if token in SEPARATORS:
            segments.append([])
            redirected = False
        elif token and set(token) <= set("<>&|;()"):      # >, >>, >&, <
            redirected = True
        elif not redirected:
            segments[-1].append(token)
    return [s for s in segments if s]


def extract(text: str, path: str) -> list[DocCommand]:
    """The `lavi-label` commands in the fenced shell blocks of one markdown text."""
    commands: list[DocCommand] = []
    fence: str | None = None                   # the open fence's marker, inside a block
    block: list[tuple[int, str]] | None = None  # the open block's lines, when it is a shell block
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith(("```", "~~~")):
                fence = stripped[:3]
                lang = stripped[3:].strip().split(" ")[0].lower()
                block = [] if lang in SHELL_BLOCKS else None
            continue
        if stripped.startswith(fence) and not stripped.strip(fence[0]):
            if block is not None:
                commands += _block_commands(block, path)
            fence, block = None, None
        elif block is not None:
            block.append((number, line))
    return commands


def _block_commands(block: list[tuple[int, str]], path: str) -> list[DocCommand]:
    exported: dict[str, str] = {}
    out: list[DocCommand] = []
    for number, text in _logical_lines(block):
        if not re.search(rf"(^|\s){PROGRAM}(\s|$)", text) and not text.startswith("export "):
            continue                           # prose, a tree, a comment: not a lavi-label command
        try:
            segments = _segments(text)
        except ValueError as err:              # unbalanced quotes
            out.append(DocCommand(path, number, (), (), text, f"shell syntax: {err}"))
            continue
        for words in segments:
            env = dict(exported)
            if words[0] == "export":
                exported.update(w.split("=", 1) for w in words[1:] if ASSIGNMENT.match(w))
                continue
            while words and ASSIGNMENT.match(words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words and words[0] == PROGRAM:
                out.append(DocCommand(path, number, tuple(words[1:]), tuple(sorted(env.items())),
                                      shlex.join(words)))
    return out


def _all_commands() -> list[DocCommand]:
    commands: list[DocCommand] = []
    for doc in DOCS:
        commands += extract(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))
    return commands


def _walk(command: click.Command):
    yield command
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _walk(sub)


def _missing_file_ok(callback):
    """A callback that reads a file named by the value (`--json-schema FILE`) accepts a file that is not there."""
    def relaxed(ctx, param, value):
        try:
            return callback(ctx, param, value)
        except click.BadParameter:
            if isinstance(value, str) and not os.path.exists(os.path.expanduser(value)):
                return value
            raise
    return relaxed


@pytest.fixture(scope="module")
def parser_env():
    """Files named need not exist; no environment variable of the caller satisfies a documented command."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        for command in _walk(main):
            for param in command.params:
                if isinstance(param.type, click.Path) and param.type.exists:
                    mp.setattr(param.type, "exists", False)
                if param.callback is not None:
                    mp.setattr(param, "callback", _missing_file_ok(param.callback))
                envvars = param.envvar if isinstance(param.envvar, (list, tuple)) else [param.envvar]
                for name in filter(None, envvars):
                    mp.delenv(name, raising=False)
        yield mp


def check(command: DocCommand) -> str | None:
    """None when the command parses; else a message naming the file, the line and the command."""
    if command.shell_error:
        return f"{command.where}: {command.text}\n  {command.shell_error}"
    saved = {k: os.environ.get(k) for k, _ in command.env}
    os.environ.update(dict(command.env))
    try:
        cmd: click.Command = main
        name, argv, parent = PROGRAM, list(command.argv), None
        while isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=name, parent=parent)
            if not argv:
                raise click.UsageError(f"`{ctx.command_path}` needs a subcommand", ctx)
            name, sub, argv = cmd.resolve_command(ctx, argv)
            if sub is None:
                raise click.UsageError(f"no such command {name!r}", ctx)
            cmd, parent = sub, ctx
        with cmd.make_context(name, argv, parent=parent, resilient_parsing=False):
            pass
    except click.exceptions.Exit as stop:                   # --help, --version
        if stop.exit_code:
            return f"{command.where}: {command.text}\n  exits {stop.exit_code}"
    except click.ClickException as err:
        return f"{command.where}: {command.text}\n  {type(err).__name__}: {err.format_message()}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return None


COMMANDS = _all_commands()


def test_docs_show_commands():
    """Guards against an extractor that silently finds nothing (a changed fence style, a moved docs dir)."""
    paths = {c.path for c in COMMANDS}
    assert "README.md" in paths
    assert len(COMMANDS) >= 20, [c.where for c in COMMANDS]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(command: DocCommand, parser_env):
    """Guards against a documented command that the CLI no longer accepts as written."""
    error = check(command)
    assert error is None, error


BROKEN = """\
# Example

```sh
export RAY_API_SERVER_ADDRESS=http://HEAD:8265
lavi-label status JOB
{command}
```
"""


@pytest.mark.parametrize("command, reason", [
    ("lavi-label run photos/ --out labels/ --no-such-flag", "--no-such-flag"),
    ("lavi-label run photos/ --out labels/ --workers four", "four"),
    ("lavi-label run photos/ --out labels/ --clips scenes", "scenes"),
    ("lavi-label bench modle --device cpu", "modle"),
    ("lavi-label bench", "needs a subcommand"),
    ("lavi-label train --out runs/x \\\n    --steps many", "many"),
])
def test_wrong_command_is_reported(command: str, reason: str, parser_env):
    """Guards against a check that cannot fail: a wrong flag, value or subcommand is reported by line."""
    found = extract(BROKEN.format(command=command), "fake.md")
    assert [c.line for c in found] == [5, 6]
    assert check(found[0]) is None                       # the exported address satisfies --address
    error = check(found[1])
    assert error is not None and error.startswith("fake.md:6: lavi-label ")
    assert reason in error


def test_shell_syntax_is_handled():
    """Guards against shell syntax read as CLI arguments: env prefixes, pipes, &&, redirections, comments."""
    text = "\n".join([
        "```",
        "# a comment line: lavi-label run nothing",
        "$ AWS_ACCESS_KEY_ID=x lavi-label run 's3://b/**' --out o/ | tee log && echo done > f 2>&1",
        "lavi-label status JOB | lavi-label logs JOB --follow   # then watch",
        "lavi-label run a --workers 2 > out.log 2>err.log; lavi-label list",
        "lavi-label run a \\",
        "    --question \"how many?\" --out http://h/x#y",
        "```",
        "```python",
        "lavi-label = 'not shell'",
        "```",
    ])
    found = extract(text, "x.md")
    assert [(c.line, c.argv) for c in found] == [
        (3, ("run", "s3://b/**", "--out", "o/")),
        (4, ("status", "JOB")),
        (4, ("logs", "JOB", "--follow")),
        (5, ("run", "a", "--workers", "2")),
        (5, ("list",)),
        (6, ("run", "a", "--question", "how many?", "--out", "http://h/x#y")),
    ]
    assert dict(found[0].env) == {"AWS_ACCESS_KEY_ID": "x"}
