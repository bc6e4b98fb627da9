"""`lavi-label distill`: a LaVi student made from a teacher's labels of the user's own corpus.

1. sample: a deterministic sample of the INPUTs' items (the smallest sha1(seed, uri)), split into train and
   held-out by item (`DIR/sample/{train,held_out}.jsonl`, manifests the pipeline reads);
2. teacher: the teacher labels both parts through the pipeline (`DIR/teacher/{train,held_out}/TASK/`, Parquet);
3. student: the student (a LaVi checkpoint, typically `convert`ed from the teacher) is trained on the teacher's ok
   rows of the train part by `lavi-label train`'s code (`DIR/student/`, a checkpoint that resumes);
4. student labels: the student labels the held-out part (`DIR/student_labels/held_out/TASK/`);
5. score: `DIR/distill.json`: agreement with the teacher on the held-out rows (exact match, token F1), object F1
   and VQA accuracy of both where the INPUT is a manifest with ground truth (shapes-v1's), and both models'
   captions/s measured side by side in this run.
Every stage resumes: a finished one (its `_summary.json`, the student's last step) is skipped, a killed one
continues where it stopped (the pipeline's resume, training's checkpoints).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from jobs.console import cli_logging
from jobs.distill_score import (CARD_BEGIN, CARD_END, agreement, card_section, fmt, ground_truth, output_rows,
                                 time_captions)

from pipeline.sources import sample, sample_key
from schemas.rows import CAPTION, TASKS, VQA

log = logging.getLogger(__name__)
PARTS = ("train", "held_out")


def sample_entries(entries, n: int, held_out: float, seed: int) -> dict[str, list[dict]]:
    """The n entries of smallest sha1(seed, uri) (streamed: memory for n), split by a second hash of the uri: an
    item's part depends on its uri and the seed only, never on the rest of the corpus. Each part gets at least one
    entry when the sample has two."""
    picked = sample(entries, n, seed)
    split = {part: [] for part in PARTS}
    for e in picked:
        split["held_out" if sample_key(seed, e["uri"], "held-out:") < held_out * 2**64 else "train"].append(e)
    for small, big in (("held_out", "train"), ("train", "held_out")):
        if not split[small] and len(split[big]) > 1:
            sign = 1 if small == "held_out" else -1
            move = min(split[big], key=lambda e: sample_key(seed, e["uri"], "held-out:") * sign)
            split[big].remove(move)
            split[small].append(move)
    return split


def _label(stage: str, manifest: str, out: str, task: str, model: str, opts: dict, overwrite: bool = False) -> None:
    from pipeline.config import RunConfig
    from pipeline.driver import run as run_pipeline
    from pipeline.output import Output
    from pipeline.summary import format_summary

    if not overwrite and Output(out).read_summary() is not None:
        click.echo(f"{stage}: {out} is complete (skipped)")
        return
    click.echo(f"{stage}: {model} -> {out}")
    config = RunConfig(inputs=(manifest,), out=out, task=task, model=model,
                       prompt=opts["prompt"] if task == CAPTION else None,
                       questions=opts["questions"] if task == VQA else (), overwrite=overwrite, **opts["run"])
    click.echo(format_summary(run_pipeline(config)))


@click.command("distill")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--teacher", required=True, help="The model whose labels the student learns: a LLaVA-OneVision or LaVi "
              "checkpoint directory.")
@click.option("--student", required=True, type=click.Path(exists=True, file_okay=False),
              help="The LaVi checkpoint to train (typically `lavi-label convert TEACHER --out STUDENT`).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Work directory (resumed if it holds one).")
@click.option("--sample", "n_sample", type=int, default=1000, show_default=True, help="Items of the corpus to label.")
@click.option("--held-out", type=float, default=0.2, show_default=True, help="Fraction of the sample held out.")
@click.option("--task", "tasks", type=click.Choice(TASKS), multiple=True,
              help="caption and/or vqa (repeatable; default caption): the student learns each.")
@click.option("--prompt", default=None, help="Caption prompt (default: each model's prompt for the media type).")
@click.option("--question", "questions", multiple=True, help="A VQA question asked of every item (repeatable); a "
              "manifest's questions column is asked too.")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--batch-size", type=int, default=None, help="Rows per generation batch (default: the pipeline's).")
@click.option("--gpus-per-worker", default=0.0, show_default=True, help="GPUs per labeler actor; 0 runs on CPU.")
@click.option("--address", default=None, help="Ray cluster to join (default: a local Ray on 127.0.0.1).")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for remote INPUTs, as for `run` (repeatable).")
@click.option("--steps", type=int, default=2000, show_default=True, help="Student training steps.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=int, default=100, show_default=True)
@click.option("--batch-items", type=int, default=32, show_default=True, help="Items per training step.")
@click.option("--loss-per", type=click.Choice(["token", "row"]), default="row", show_default=True)
@click.option("--freeze-backbones", is_flag=True, help="Train only the student's conditioner.")
@click.option("--checkpoint-every", type=int, default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sample and training seed.")
@click.option("--device", default="auto", show_default=True, help="Training and timing device: cpu, cuda; auto: cuda "
              "when available.")
@click.option("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default).")
@click.option("--timing-items", type=int, default=64, show_default=True, help="Held-out items both models caption "
              "for the speed figures.")
@click.option("--card", type=click.Path(dir_okay=False), help="Replace the distillation section of this model card.")
def distill_cmd(inputs: tuple[str, ...], teacher: str, student: str, out: str, n_sample: int, held_out: float,
                tasks: tuple[str, ...], prompt: str | None, questions: tuple[str, ...], max_new_tokens: int,
                batch_size: int | None, gpus_per_worker: float, address: str | None,
                storage_options: tuple[str, ...], steps: int, lr: float,
                warmup: int, batch_items: int, loss_per: str, freeze_backbones: bool, checkpoint_every: int, seed: int,
                device: str, threads: int, timing_items: int, card: str | None) -> None:
    """Distil a LaVi on your own corpus: the teacher labels a sample, the student learns those labels, and both are
    scored on held-out items. Reruns resume."""
    import sys

    from jobs.evaluate import write_card
    from jobs.train import train_model
    from pipeline.config import parse_storage_options
    from pipeline.cluster import connect_ray
    from pipeline.models import model_info
    from pipeline.sources import iter_entries

    cli_logging()
    if n_sample < 2 or not 0 < held_out < 1:
        raise click.UsageError("--sample must be >= 2 and --held-out a fraction in (0, 1)")
    tasks = tuple(dict.fromkeys(tasks or (CAPTION,)))
    student_config = json.loads((Path(student) / "config.json").read_text())
    if "decoder" not in student_config:
        raise click.UsageError(f"--student {student} is not a LaVi checkpoint (its model_type is "
                               f"{student_config.get('model_type')!r}): make one with `lavi-label convert`")
    try:
        teacher_name = model_info(teacher, parse_storage_options(storage_options))["name"]
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    settings = {"inputs": list(inputs), "teacher": teacher, "student": str(student), "sample": n_sample,
                "held_out": held_out, "seed": seed, "tasks": list(tasks), "prompt": prompt, "questions": list(questions)}
    saved = work / "distill_settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise click.UsageError(f"{out} holds a distillation with other settings ({saved}): choose another --out")
    saved.write_text(json.dumps(settings, indent=2))
    stages: dict[str, float] = {}

    t0 = time.time()
    manifests = {part: work / "sample" / f"{part}.jsonl" for part in PARTS}
    if all(m.exists() for m in manifests.values()):
        split = {part: [json.loads(line) for line in m.read_text().splitlines()] for part, m in manifests.items()}
        click.echo(f"[1/5] sample: {len(split['train'])} train, {len(split['held_out'])} held-out items "
                   f"(from {work / 'sample'})")
    else:
        try:
            entries = iter_entries(inputs, parse_storage_options(storage_options))
            split = sample_entries(entries, n_sample, held_out, seed)
        except ValueError as err:
            raise click.UsageError(str(err)) from err
        if not split["train"] or not split["held_out"]:
            raise click.UsageError(f"the INPUTs hold {len(split['train']) + len(split['held_out'])} item(s): a "
                                   "distillation needs at least two")
        (work / "sample").mkdir(exist_ok=True)
        for part, m in manifests.items():
            tmp = m.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in split[part]))
            tmp.rename(m)
        click.echo(f"[1/5] sample: {len(split['train'])} train, {len(split['held_out'])} held-out items "
                   f"-> {work / 'sample'}")
    stages["sample_s"] = time.time() - t0

    opts = {"prompt": prompt, "questions": questions,
            "run": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "gpus_per_worker": gpus_per_worker,
                    "address": address, "storage_options": storage_options}}
    owned = connect_ray(address)  # one Ray for every labeling stage
    try:
        t0 = time.time()
        for part in PARTS:
            for task in tasks:
                _label(f"[2/5] teacher labels {part} ({task})", str(manifests[part]),
                       str(work / "teacher" / part / task), task, teacher, opts)
        stages["teacher_s"] = time.time() - t0

        t0 = time.time()
        student_dir = work / "student"
        state = student_dir / "train_state.json"
        trained = state.exists() and json.loads(state.read_text())["step"] >= steps and (
            student_dir / "train_summary.json").exists()
        if trained:
            click.echo(f"[3/5] student: {student_dir} is trained ({steps} steps; skipped)")
        else:
            click.echo(f"[3/5] student: {student} trained on the teacher's train labels -> {student_dir}")
            try:
                train_model(out=str(student_dir), init=None if state.exists() else str(student),
                            fusion=student_config.get("fusion", "viln"),
                            data=tuple(str(work / "teacher" / "train" / t) for t in tasks), steps=steps, lr=lr,
                            warmup=warmup, batch_items=batch_items, frames=str(student_config.get("default_frames", 4)),
                            loss_per=loss_per, seed=seed, checkpoint_every=checkpoint_every, device=device,
                            threads=threads, freeze_backbones=freeze_backbones)
            except click.BadParameter as err:
                raise click.UsageError(f"the teacher's train labels cannot train the student: {err.message}") from err
        training = json.loads((student_dir / "train_summary.json").read_text())
        stages["student_s"] = time.time() - t0

        t0 = time.time()
        for task in tasks:  # a student trained (further) in this run labels afresh
            _label(f"[4/5] student labels held_out ({task})", str(manifests["held_out"]),
                   str(work / "student_labels" / "held_out" / task), task, str(student_dir), opts, overwrite=not trained)
        stages["student_labels_s"] = time.time() - t0
    finally:
        if owned:
            import ray

            ray.shutdown()

    t0 = time.time()
    teacher_rows = [r for t in tasks for r in output_rows(str(work / "teacher" / "held_out" / t))]
    student_rows = [r for t in tasks for r in output_rows(str(work / "student_labels" / "held_out" / t))]
    doc = {"inputs": list(inputs), "teacher": teacher, "teacher_name": teacher_name, "student_init": str(student),
           "student": str(student_dir), "student_name": model_info(str(student_dir))["name"], "tasks": list(tasks),
           "sample": {"train": len(split["train"]), "held_out": len(split["held_out"]), "seed": seed},
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
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    click.echo(f"[5/5] score: agreement on the held-out rows; captions/s of both on "
               f"{min(timing_items, len(split['held_out']))} held-out items ({device})")
    doc["speed"] = time_captions({"teacher": teacher, "student": str(student_dir)}, split["held_out"][:timing_items],
                                 device, max_new_tokens, parse_storage_options(storage_options))
    stages["score_s"] = time.time() - t0
    doc["stages"] = stages
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (work / "distill.json").write_text(json.dumps(doc, indent=2))
    for task, a in doc["agreement"].items():
        click.echo(f"{task}: student agrees with the teacher on {a['rows']} held-out rows: exact match "
                   f"{fmt(a['exact_match'])}, token F1 {fmt(a['token_f1'])}")
    for key, ratio in (doc.get("ground_truth") or {}).get("ratio", {}).items():
        click.echo(f"{key}: teacher {fmt(doc['ground_truth']['teacher'][key])}, student "
                   f"{fmt(doc['ground_truth']['student'][key])} ({ratio:.2f} of the teacher)")
    sp = doc["speed"]
    click.echo(f"captions/s on {device}: teacher {sp['teacher']['captions_per_s']:.1f}, student "
               f"{sp['student']['captions_per_s']:.1f} ({sp['student_over_teacher']:.2f}x)")
    click.echo(f"distill.json: {work / 'distill.json'}")
    if card:
        write_card(Path(card), card_section(doc, "lavi-label " + " ".join(sys.argv[1:])), CARD_BEGIN, CARD_END)
        click.echo(f"card: {card}")
