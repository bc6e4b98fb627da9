"""Scoring of labels against a shapes-v1 manifest (SHAPES.md, "Scoring").

Caption object F1 is micro-averaged over all scored caption rows of a category: true positives,
predicted and true tuple counts are summed over rows, each row's tuples compared as a multiset
(a tuple predicted twice counts once as a hit and once as a false positive). The truth tuples are
parsed from the manifest's canonical caption. Exact match compares the stripped text with the
canonical caption. VQA is exact match of the stripped, lower-cased answer. A row with an error
status or null text scores as wrong; an expected (item, task, prompt) with no row at all is
counted in n_missing and scored as wrong too. Tasks are expected only if at least one row has them.
Every row is scored, duplicates included; counts hold the rows seen per category, without the missing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import fsspec
import pyarrow.dataset as ds

from schemas.rows import CAPTION, OK, TASKS, TRUNCATED, VQA
from shapes import spec
from shapes.corpus import read_manifest

_OBJ = r"\ba (small|large) (red|green|blue|yellow) (circle|square|triangle) "
_WHERE = "|".join(sorted(spec.CELL_WHERE, key=len, reverse=True))  # longest first: "at the top left" before "at the top"
_IMAGE_RE = re.compile(_OBJ + f"({_WHERE})")
_VIDEO_RE = re.compile(_OBJ + "(moves left|moves right|moves up|moves down|stays still)")
_CELL = {w: i for i, w in enumerate(spec.CELL_WHERE)}
_MOTION = {p: m for m, p in spec.MOTION_PHRASE.items()}
SCORED_STATUSES = (OK, TRUNCATED)


def parse_caption(text: str | None, media_type: str) -> list[tuple[str, str, str, int | str]]:
    """Every object phrase in text: (size, colour, shape, cell) for images, (size, colour, shape, motion) for videos."""
    if not text:
        return []
    if media_type == "image":
        return [(sz, c, sh, _CELL[w]) for sz, c, sh, w in _IMAGE_RE.findall(text.lower())]
    return [(sz, c, sh, _MOTION[m]) for sz, c, sh, m in _VIDEO_RE.findall(text.lower())]


def _norm_uri(uri: str) -> str:
    return uri.removeprefix("file://")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _count_missing(truth: dict[str, dict], seen: set[tuple[str, str, str]], cap: dict[str, Counter],
                   vqa: dict[str, Counter], counts: Counter) -> None:
    """Expected (item, task, prompt) rows that no row answered: counted in n_missing and scored as wrong."""
    tasks = {t for _, t, _ in seen}
    for uri, entry in truth.items():
        media = entry["media_type"]
        if CAPTION in tasks and (uri, CAPTION, "") not in seen:
            counts["n_missing"] += 1
            cap[media]["true"] += len(parse_caption(entry["caption"], media))
            cap[media]["n"] += 1
        if VQA in tasks:
            missing = sum((uri, VQA, q) not in seen for q in entry["questions"])
            counts["n_missing"] += missing
            vqa[media]["n"] += missing


def score_rows(rows: Iterable[dict], truth: dict[str, dict]) -> dict:
    """Score label rows (uri, media_type, task, prompt, text, status) against manifest entries keyed by uri."""
    truth = {_norm_uri(u): e for u, e in truth.items()}
    answers = {u: dict(zip(e["questions"], e["answers"])) for u, e in truth.items()}
    cap = {m: Counter() for m in ("image", "video")}  # tp, n_pred, n_true, exact, n
    vqa = {m: Counter() for m in ("image", "video")}  # correct, n
    seen: set[tuple[str, str, str]] = set()
    counts = Counter()
    for row in rows:
        uri = _norm_uri(row["uri"])
        entry = truth.get(uri)
        if entry is None:
            counts["n_unknown_uri"] += 1
            continue
        media, task = entry["media_type"], row["task"]
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        expected = entry["caption"] if task == CAPTION else answers[uri].get(row["prompt"])
        if expected is None:
            counts["n_unknown_question"] += 1
            continue
        ok = row.get("status") in SCORED_STATUSES and row.get("text") is not None
        text = row["text"] if ok else None
        counts["n_errors"] += not ok
        counts[f"{media}_{task}"] += 1
        if task == CAPTION:
            seen.add((uri, CAPTION, ""))
            pred, true = Counter(parse_caption(text, media)), Counter(parse_caption(expected, media))
            c = cap[media]
            c["tp"] += sum((pred & true).values())
            c["pred"] += sum(pred.values())
            c["true"] += sum(true.values())
            c["exact"] += text is not None and text.strip() == expected
            c["n"] += 1
        else:
            seen.add((uri, VQA, row["prompt"]))
            vqa[media]["correct"] += text is not None and text.strip().lower() == expected
            vqa[media]["n"] += 1
    _count_missing(truth, seen, cap, vqa, counts)
    out: dict = {}
    for m in ("image", "video"):
        c = cap[m]
        out[f"{m}_caption_f1"] = _ratio(2 * c["tp"], c["pred"] + c["true"]) if c["n"] else None
        out[f"{m}_caption_exact"] = _ratio(c["exact"], c["n"])
        out[f"{m}_vqa_acc"] = _ratio(vqa[m]["correct"], vqa[m]["n"])
    out["vqa_acc"] = _ratio(vqa["image"]["correct"] + vqa["video"]["correct"], vqa["image"]["n"] + vqa["video"]["n"])
    out["n_missing"] = counts["n_missing"]
    out["counts"] = {
        "image_caption": counts["image_caption"], "video_caption": counts["video_caption"],
        "image_vqa": counts["image_vqa"], "video_vqa": counts["video_vqa"],
        "n_errors": counts["n_errors"], "n_missing": counts["n_missing"],
        "n_unknown_uri": counts["n_unknown_uri"], "n_unknown_question": counts["n_unknown_question"],
    }
    return out


def score_parquet(parquet_uri_or_dir: str, manifest_uri: str, storage_options: dict | None = None) -> dict:
    """Score the pipeline's Parquet output (a file or a directory of files) against a manifest."""
    truth = {e["uri"]: e for e in read_manifest(manifest_uri, storage_options)}
    fs, path = fsspec.core.url_to_fs(parquet_uri_or_dir, **(storage_options or {}))
    dataset = ds.dataset(path, filesystem=fs, format="parquet")  # skips _summary.json and dot files
    columns = ["uri", "media_type", "task", "prompt", "text", "status"]
    rows = (r for batch in dataset.to_batches(columns=columns) for r in batch.to_pylist())
    return score_rows(rows, truth)
