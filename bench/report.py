"""What every benchmark records: the machine, the versions, the command line; the JSON and the
BENCHMARKS.md section (one per run key, replaced on rerun)."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import torch


def command_line() -> str:
    """The exact command, as typed (`python -m bench` when run as a module)."""
    prog = Path(sys.argv[0]).name
    if prog == "__main__.py":
        prog = "python -m bench"
    return shlex.join([prog, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "(in-process)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"{_cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
    return out


def write_json(doc: dict, uri: str) -> None:
    """Write the result document to a local path or, through fsspec, to any URI."""
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if "://" in uri:
        import fsspec  # only for remote outputs: the GPU machine may not have it

        with fsspec.open(uri, "w") as f:
            f.write(text)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    Path(uri).write_text(text)


def write_section(path: str | Path, key: str, body: str) -> None:
    """Put `body` in BENCHMARKS.md between this key's markers, replacing an earlier run's section."""
    path = Path(path)
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `lavi-label bench ...`: " \
        "one section per run, replaced when that run is repeated.\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def section_head(title: str, doc: dict) -> list[str]:
    """A run section's first lines: its title, the command that wrote it and the versions it ran with."""
    return [f"## {title}", "", f"`{doc['command']}`", "",
            "versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), ""]


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with (key, header) columns; floats at 4 significant digits."""
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int) and abs(v) >= 10**6:
            return f"{v:.3e}"
        return str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def merge_sections(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every run section of `src` (e.g. a BENCHMARKS.md written on the GPU machine) into `dst`,
    replacing those keys there. Returns the keys copied."""
    text = Path(src).read_text()
    keys = re.findall(r"<!-- bench:(\S+) -->", text)
    for key in keys:
        body = re.search(re.escape(f"<!-- bench:{key} -->") + r"\n(.*?)" + re.escape(f"<!-- /bench:{key} -->"),
                         text, re.S)
        if body:
            write_section(dst, key, body.group(1))
    return keys
