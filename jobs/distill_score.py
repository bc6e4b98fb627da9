"""What a distillation run measures (`lavi-label distill`'s last stage, jobs.distill): the student's agreement
with its teacher on the held-out rows, both models' captions/s side by side, and the model card's section;
`score_stage` writes them into distill.json's document, `echo_results` shows them."""
from __future__ import annotations

import collections
import re
import statistics
import time
from pathlib import Path

import click

from jobs.distill_config import DistillConfig
from jobs.outdir import join
from pipeline.models import model_info
from schemas.rows import CAPTION, ERROR, OK

CARD_BEGIN, CARD_END = "<!-- distill:begin -->", "<!-- distill:end -->"


def token_f1(a: str | None, b: str | None) -> float:
    """SQuAD-style F1 of two texts' lower-cased word tokens (1 when both have none)."""
    ta, tb = re.findall(r"\w+", (a or "").lower()), re.findall(r"\w+", (b or "").lower())
    if not ta and not tb:
        return 1.0
    common = sum((collections.Counter(ta) & collections.Counter(tb)).values())
    return 0.0 if common == 0 else 2 * common / (len(ta) + len(tb))


def agreement(teacher: list[dict], student: list[dict]) -> dict:
    """Per task, over the teacher's held-out rows: the student's exact match and token F1 (a row the student
    errored on, or lacks, scores 0), and the rows each errored on."""
    def key(r):
        return r["item_id"], r["clip_index"], r["task"], r["prompt"]

    got = {key(r): r for r in student}
    out = {}
    for task in sorted({r["task"] for r in teacher}):
        rows = [r for r in teacher if r["task"] == task and r["status"] == OK]
        exact = f1 = 0.0
        for r in rows:
            s = got.get(key(r))
            ok = s is not None and s["status"] != ERROR
            exact += ok and s["text"] == r["text"]
            f1 += token_f1(r["text"], s["text"]) if ok else 0.0
        out[task] = {"rows": len(rows), "exact_match": exact / len(rows) if rows else None,
                     "token_f1": f1 / len(rows) if rows else None,
                     "teacher_errors": sum(r["task"] == task and r["status"] != OK for r in teacher),
                     "student_errors": sum(r["task"] == task and r["status"] == ERROR for r in student)}
    return out


def output_rows(uri: str, storage_options: dict | None = None) -> list[dict]:
    """Every row of a pipeline output (local or object storage)."""
    from pipeline.output import Output
    from workers.storage import read_parquet_file

    output = Output(uri, storage_options)
    rows = []
    for path in output.part_paths():
        with output.fs.open(path, "rb") as f:
            rows += read_parquet_file(f).to_pylist()
    return rows


def time_captions(models: dict[str, str], entries: list[dict], device: str, max_new_tokens: int,
                  storage_options: dict | None = None, repeats: int = 3) -> dict:
    """Captions/s of each model over the same items (decoded once per model, to its own input contract) through the
    labeler actor's code, the models taking turns `repeats` times after a warm-up each: the median pass counts."""
    import pyarrow as pa

    from lavi.serving.engine import Engine
    from schemas.manifest import ITEM_SCHEMA, make_item
    from workers.decode import DecodeSettings
    from workers.labeler import Labeler
    from workers.model_cache import local_model_dir
    from workers.units import decode_batch

    items = pa.Table.from_pylist([make_item(e["uri"], [{"task": CAPTION, "prompt": e.get("prompt")}],
                                            e.get("media_type")) for e in entries], schema=ITEM_SCHEMA)
    runs = {}
    for name, path in models.items():
        engine = Engine.load(local_model_dir(path, storage_options), device=device, max_batch=64)
        settings = DecodeSettings(image_size=engine.image_size, frames_per_clip=engine.default_frames, isolate=False,
                                  pinpoints=engine.pinpoints, dynamic=engine.dynamic,
                                  storage_options=storage_options or {})
        labeler = Labeler.from_engine(engine, job_id="distill-timing", generation={"max_new_tokens": max_new_tokens})
        decoded = decode_batch(items, settings)
        labeler(decoded)  # warm-up
        runs[name] = (labeler, decoded, [])
    for _ in range(repeats):
        for labeler, decoded, walls in runs.values():
            t0 = time.perf_counter()
            labeler(decoded)
            walls.append(time.perf_counter() - t0)
    out = {name: {"captions": decoded.num_rows, "wall_s": statistics.median(walls),
                  "captions_per_s": decoded.num_rows / statistics.median(walls)}
           for name, (_, decoded, walls) in runs.items()}
    out["student_over_teacher"] = out["student"]["captions_per_s"] / out["teacher"]["captions_per_s"]
    out.update(device=device, repeats=repeats, max_new_tokens=max_new_tokens)
    return out


def ground_truth(entries: list[dict]) -> dict[str, dict] | None:
    """Ground truth by uri where every sampled entry carries it (a shapes-v1 manifest: caption, questions, answers)."""
    if entries and all({"caption", "answers", "questions"} <= set(e) for e in entries):
        return {e["uri"]: e for e in entries}
    return None


def card_section(doc: dict, command: str) -> str:
    """MODEL_CARD.md's distillation figures, from distill.json."""
    s, sp, tr = doc["sample"], doc["speed"], doc["training"]
    lines = [CARD_BEGIN, f"Written by: `{command}` on {sp['device']}, {doc['finished']}.", "",
             f"Teacher `{doc['teacher_name']}`, student `{doc['student_name']}` (from `{doc['student_init']}`), "
             f"{s['train']} train and {s['held_out']} held-out items of `{' '.join(doc['inputs'])}` (seed {s['seed']}); "
             f"the student trained {tr['steps']} steps in {tr['wall_s'] / 60:.1f} min on {tr['device']} "
             f"({tr.get('threads', '?')} threads), final loss {tr['final'].get('loss', float('nan')):.4f}.", "",
             "| held-out figure | teacher | student | student / teacher |", "| --- | --- | --- | --- |"]
    for task, a in doc["agreement"].items():
        lines.append(f"| {task}: agreement with the teacher, exact match / token F1 ({a['rows']} rows) | | "
                     f"{fmt(a['exact_match'])} / {fmt(a['token_f1'])} | |")
    gt = doc.get("ground_truth")
    if gt:
        for key, label in (("image_caption_f1", "image caption object F1"), ("image_vqa_acc", "image VQA accuracy"),
                           ("video_caption_f1", "video caption object F1"), ("video_vqa_acc", "video VQA accuracy")):
            t, st = gt["teacher"].get(key), gt["student"].get(key)
            if t is not None or st is not None:
                lines.append(f"| {label} (ground truth) | {fmt(t)} | {fmt(st)} | {fmt(gt['ratio'].get(key))} |")
    lines.append(f"| captions/s ({sp['device']}, {sp['teacher']['captions']} held-out items, median of "
                 f"{sp['repeats']}) | {sp['teacher']['captions_per_s']:.1f} | {sp['student']['captions_per_s']:.1f} | "
                 f"{sp['student_over_teacher']:.2f} |")
    lines.append(CARD_END)
    return "\n".join(lines)


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def score_stage(config: DistillConfig, work: str, storage: dict, split: dict[str, list[dict]], teacher_name: str,
                training: dict) -> dict:
    """[5/5] distill.json's figures: agreement on the held-out rows, ground truth where the sample has it, and
    both models' captions/s side by side."""
    student_dir = join(work, "student")
    teacher_rows = [r for t in config.tasks for r in output_rows(join(work, "teacher", "held_out", t), storage)]
    student_rows = [r for t in config.tasks
                    for r in output_rows(join(work, "student_labels", "held_out", t), storage)]
    doc = {"inputs": list(config.inputs), "teacher": config.teacher, "teacher_name": teacher_name,
           "student_init": str(config.student), "student": student_dir,
           "student_name": model_info(student_dir, storage)["name"], "tasks": list(config.tasks),
           "sample": {"train": len(split["train"]), "held_out": len(split["held_out"]), "seed": config.seed},
           "agreement": agreement(teacher_rows, student_rows),
           "training": {k: training[k] for k in ("steps", "wall_s", "device", "threads", "final", "data")
                        if k in training}}
    truth = ground_truth(split["held_out"])
    if truth:
        from shapes.score import score_rows

        gt = {"teacher": score_rows(teacher_rows, truth), "student": score_rows(student_rows, truth)}
        gt["ratio"] = {k: (gt["student"][k] / gt["teacher"][k]) for k in gt["teacher"]
                       if k.endswith(("_f1", "_acc")) and gt["teacher"][k] and gt["student"].get(k) is not None}
        doc["ground_truth"] = gt
    device = config.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    click.echo(f"[5/5] score: agreement on the held-out rows; captions/s of both on "
               f"{min(config.timing_items, len(split['held_out']))} held-out items ({device})")
    doc["speed"] = time_captions({"teacher": config.teacher, "student": student_dir},
                                 split["held_out"][:config.timing_items], device, config.max_new_tokens, storage)
    return doc


def echo_results(doc: dict, written: str, card: str | None) -> None:
    """The figures on the console, then the card's section replaced (`card`)."""
    import sys

    from jobs.evaluate import write_card

    for task, a in doc["agreement"].items():
        click.echo(f"{task}: student agrees with the teacher on {a['rows']} held-out rows: exact match "
                   f"{fmt(a['exact_match'])}, token F1 {fmt(a['token_f1'])}")
    for key, ratio in (doc.get("ground_truth") or {}).get("ratio", {}).items():
        click.echo(f"{key}: teacher {fmt(doc['ground_truth']['teacher'][key])}, student "
                   f"{fmt(doc['ground_truth']['student'][key])} ({ratio:.2f} of the teacher)")
    sp = doc["speed"]
    click.echo(f"captions/s on {sp['device']}: teacher {sp['teacher']['captions_per_s']:.1f}, student "
               f"{sp['student']['captions_per_s']:.1f} ({sp['student_over_teacher']:.2f}x)")
    click.echo(f"distill.json: {written}")
    if card:
        write_card(Path(card), card_section(doc, "lavi-label " + " ".join(sys.argv[1:])), CARD_BEGIN, CARD_END)
        click.echo(f"card: {card}")
