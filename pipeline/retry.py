"""`lavi-label retry OUT`: relabel the error rows of a finished output, each replaced exactly once.

1. scan: the error rows of OUT (of the chosen stages) and the items they belong to (`list` errors, items refused
   when listed, are not retried: they need questions, not another try);
2. label: those items, asked only the retried rows' prompts, go through the same pipeline with the output's own
   model name and generation settings into `OUT/_retry/` (a scratch output: readers skip `_` paths, and a killed
   retry resumes there);
3. merge: every part file that held a retried row is rewritten under its own name (the same items, so the same
   `part_name`), written under `_tmp/` and moved over the old one: a reader sees the old file or the new one,
   never half of either. An item keeps its rows that were not retried; its retried rows are replaced by what
   the retry produced for it (the same row_id when the row's clip and prompt are the same; a video that now
   decodes into clips replaces its one error row by its clip rows; a video's clip groups may lie in several
   files, and each takes the new rows within the time spans of its own retried rows). No row_id appears twice.
   A retried video is relabelled whole in the scratch output, its good groups too (only the retried spans are
   kept).
4. `_summary.json`: totals read back again, and the retry appended to its `retries`; `_retry/` is removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.output import RETRY_DIR, SHARDS_DIR, TMP_DIR, Output
from pipeline.summary import totals
from schemas.constraint import Constraint
from schemas.rows import CAPTION, COLUMNS, DECODE, ERROR, INFER, READ, UNKNOWN
from workers.parts import add_totals, held_groups, negated, parse_part_name, part_totals
from workers.storage import read_parquet_file

log = logging.getLogger(__name__)
RETRY_STAGES = (READ, DECODE, INFER)
_SCAN = ["item_id", "row_id", "uri", "media_type", "task", "prompt", "status", "error_stage"]
# what a retry takes from the output's metadata, so its labels are those the run would have written
_GENERATION = ("max_new_tokens", "temperature", "top_p", "seed", "frames", "clip_seconds", "max_clips", "quantize",
               "dtype", "visual_compress", "clips", "min_clip_seconds", "max_clip_seconds", "clips_per_group")


@dataclasses.dataclass
class Retried:
    """The error rows chosen for a retry, by item."""

    rows: dict[str, set[str]]  # item_id -> row_ids retried
    entries: dict[str, dict]  # item_id -> its manifest entry (uri, media_type, prompt or questions)
    files: list[str]  # part files (paths in the output's fs) holding them
    not_retried: dict[str, int]  # error rows left as they are, by stage


def scan_errors(output: Output, stages: tuple[str, ...], task: str, prompt: str | None,
                default_prompts: dict[str, str]) -> Retried:
    """The output's error rows of `stages` (streamed a file at a time: memory for the error rows only)."""
    found = Retried({}, {}, [], {})
    defaults = set(default_prompts.values())
    for path in output.part_paths():
        with output.fs.open(path, "rb") as f:
            table = read_parquet_file(f, _SCAN)
        hit = False
        for row in table.to_pylist():
            if row["status"] != ERROR:
                continue
            if row["error_stage"] not in stages:
                found.not_retried[row["error_stage"]] = found.not_retried.get(row["error_stage"], 0) + 1
                continue
            hit = True
            found.rows.setdefault(row["item_id"], set()).add(row["row_id"])
            entry = found.entries.setdefault(row["item_id"], {"uri": row["uri"]})
            if row["media_type"] != UNKNOWN:
                entry["media_type"] = row["media_type"]
            if task == CAPTION:
                # the model's default prompt (one per media type) stays the default: a video that failed before it
                # was known to be one was asked the image prompt, and now gets the video's
                entry["prompt"] = None if prompt is None and row["prompt"] in defaults else row["prompt"]
            else:
                entry.setdefault("questions", [])
                if row["prompt"] not in entry["questions"]:
                    entry["questions"].append(row["prompt"])
        if hit:
            found.files.append(path)
    return found


def merge(output: Output, retried: Retried, new_rows: dict[str, list[dict]]) -> dict[str, Any]:
    """Rewrite each part file holding retried rows (see the module doc); returns files rewritten, rows replaced
    and the status counts of the rows put in their place."""
    replaced = 0
    status: dict[str, int] = {}
    for path in retried.files:
        with output.fs.open(path, "rb") as f:
            table = read_parquet_file(f)
        rows = table.to_pylist()
        gone = {r["row_id"] for r in rows if r["row_id"] in retried.rows.get(r["item_id"], ())}
        kept = [r for r in rows if r["row_id"] not in gone]
        have = {r["row_id"] for r in kept}
        items = list(dict.fromkeys(r["item_id"] for r in rows if r["row_id"] in gone))
        spans = {}  # item -> the time spans of its rows retried here (None: the whole item)
        for r in rows:
            if r["row_id"] in gone:
                whole = r["clip_index"] is None or spans.get(r["item_id"], []) is None
                spans[r["item_id"]] = None if whole else spans.get(r["item_id"], []) + [(r["clip_start_s"],
                                                                                          r["clip_end_s"])]
        fresh = [r for item in items for r in new_rows.get(item, [])
                 if r["row_id"] not in have and _within(r, spans[item])]
        missing = [i for i in items if not new_rows.get(i)]
        if missing:  # the scratch run is whole (its summary was written), so this is a bug, not bad luck
            raise RuntimeError(f"the retry labelled no rows for items {missing[:5]} of {path}")
        merged = pa.Table.from_pylist(kept + fresh, schema=table.schema)
        tmp = output.path(f"{TMP_DIR}/{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}")
        output.fs.makedirs(output.path(TMP_DIR), exist_ok=True)
        with output.fs.open(tmp, "wb") as f:
            pq.write_table(merged, f, compression="zstd")
        output.fs.mv(tmp, path)
        held = held_groups(table.schema.metadata)
        _update_record(output, path, part_totals(table, held), part_totals(merged, held))
        replaced += len(gone)
        for r in fresh:
            status[r["status"]] = status.get(r["status"], 0) + 1
    if output.fs.exists(output.path(TMP_DIR)):
        output.fs.rm(output.path(TMP_DIR), recursive=True)
    return {"files_rewritten": len(retried.files), "rows_replaced": replaced, "new_rows": dict(sorted(status.items()))}


def _update_record(output: Output, path: str, old: dict, new: dict) -> None:
    """A rewritten part file's shard record (pipeline.ledger) takes the file's new totals in place of its old."""
    shard = parse_part_name(path)
    record_path = output.path(f"{SHARDS_DIR}/{shard[0]:06d}.json") if shard else None
    if record_path is None or not output.fs.exists(record_path):
        return  # a legacy file, or a shard not complete: its totals are in no record yet
    record = json.loads(output.fs.cat_file(record_path))
    if record["key"] != shard[1]:
        return
    record["totals"] = add_totals(record["totals"], negated(old))
    record["totals"] = add_totals(record["totals"], new)
    output.fs.pipe_file(record_path, json.dumps(record, sort_keys=True).encode())


def _within(row: dict, spans: list[tuple[float, float]] | None) -> bool:
    """Whether a relabelled row belongs in place of rows retried over `spans` (None: a whole item's). A video's
    clip groups lie in several files: a file takes the new rows of its own groups' time spans only (a shots
    window that failed whole is one row over the window; it now decodes into the clips within it)."""
    if spans is None:
        return True
    start, end = row["clip_start_s"], row["clip_end_s"]
    return start is not None and any(a - 1e-6 <= start and end <= b + 1e-6 for a, b in spans)


def _scratch_rows(scratch: Output, items: set[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in scratch.part_paths():
        with scratch.fs.open(path, "rb") as f:
            for row in read_parquet_file(f).to_pylist():
                if row["item_id"] in items:
                    out.setdefault(row["item_id"], []).append({k: row[k] for k in COLUMNS})
    return out


def retry(out: str, stages: tuple[str, ...] = RETRY_STAGES, model: str | None = None,
          storage_options: tuple[str, ...] = (), **run_options: Any) -> dict:
    """Relabel OUT's error rows of `stages` and replace them (see the module doc); returns the updated summary,
    with this retry's figures under `retry`. `run_options` are RunConfig fields that do not change labels
    (batch_size, workers, gpus_per_worker, address, ...). Raises ValueError on an output that did not finish or
    a model other than the one that labelled it."""
    from pipeline.driver import run

    start = time.monotonic()
    bad = set(stages) - set(RETRY_STAGES)
    if bad or not stages:
        raise ValueError(f"--stage must be among {RETRY_STAGES} (list errors need questions, not a retry), "
                         f"got {stages}")
    probe = RunConfig(inputs=(out,), out=out, storage_options=storage_options)  # parses the storage options
    output = Output(out, probe.storage)
    summary, model, info = _labelled_by(output, out, model, probe.storage)
    generation = output.metadata().get("generation") or summary.get("generation") or {}
    retried = scan_errors(output, tuple(stages), generation.get("task", CAPTION), generation.get("prompt"),
                          info["default_prompts"])
    record = {"stages": list(stages), "items": len(retried.rows), "rows": sum(map(len, retried.rows.values())),
              "not_retried": dict(sorted(retried.not_retried.items()))}
    if retried.rows:
        scratch = Output(output.path(RETRY_DIR), probe.storage)
        manifest = scratch.path("_items.jsonl")
        scratch.fs.makedirs(scratch.base, exist_ok=True)
        scratch.fs.pipe_file(manifest, "".join(json.dumps(e) + "\n" for e in retried.entries.values()).encode())
        config = RunConfig(
            inputs=(scratch.uri_of(manifest),), out=scratch.uri_of(scratch.base), model=model,
            task=generation.get("task", CAPTION), storage_options=storage_options, job_id=summary["job_id"],
            **{k: generation[k] for k in _GENERATION if generation.get(k) is not None},
            **_constraint(generation.get("constraint")), **run_options)
        log.info("retry: relabelling %d error rows of %d items (stages %s) into %s", record["rows"], record["items"],
                 ", ".join(stages), config.out)
        run(config)
        record.update(merge(output, retried, _scratch_rows(scratch, set(retried.rows))))
        scratch.fs.rm(scratch.base, recursive=True)
    else:
        record.update(files_rewritten=0, rows_replaced=0, new_rows={})
    summary.update(totals(output))
    record["error_rows_left"] = summary["status"].get(ERROR, 0)
    record["wall_s"] = round(time.monotonic() - start, 3)
    record["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    summary.setdefault("retries", []).append(record)
    rate = summary.get("max_error_rate", 1.0)
    summary["error_rate_exceeded"] = summary["error_rate"] > rate
    output.write_summary(summary)
    return {**summary, "retry": record}


def _labelled_by(output: Output, out: str, model: str | None, storage: dict) -> tuple[dict, str | None, dict]:
    """OUT's summary, the model to relabel with (`model`, or the directory its summary names; None: the bundled
    one) and that model's info. ValueError for an output that did not finish, a model other than the one that
    labelled it, or questions with their own constraints (which the rows do not record)."""
    from pipeline.models import model_info

    summary = output.read_summary()
    if summary is None:
        raise ValueError(f"{out} has no _summary.json: its run did not finish; run `lavi-label run` into it again "
                         "to resume it, then retry")
    model = model if model is not None else summary.get("model_dir")
    info = model_info(model or _bundled(), storage)
    if info["name"] != summary["model"]:
        given = f"--model {model!r} is {info['name']!r}" if model else f"the bundled model is {info['name']!r}"
        raise ValueError(f"{out} was labelled by model {summary['model']!r} and {given}: a retry labels with the "
                         "model that labelled it (pass its directory as --model)")
    if summary.get("items_with_own_constraints"):
        raise ValueError(f"{out} has questions with their own choices or JSON schema (from its manifest), which its "
                         "rows do not record: rerun `lavi-label run` with that manifest into a new --out instead")
    return summary, model, info


def _constraint(spec: str | None) -> dict[str, Any]:
    """The run's constraint (generation settings) as RunConfig fields, so the retried rows keep it."""
    c = Constraint.parse(spec)
    if c is None:
        return {}
    return {"choices": c.choices} if c.choices else {"json_schema": c.json_schema}


def _bundled() -> str:
    from lavi.bundled import DEFAULT_MODEL

    return DEFAULT_MODEL
