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
continues where it stopped (the pipeline's resume, training's checkpoints). DIR may be object storage (s3://, gs://):
every file goes through fsspec (jobs.outdir), the student's checkpoint as `train` uploads a remote --out. A remote
student is labelled and timed from workers.model_cache's download, which is keyed by its URI alone: a student trained
further by a later run into the same DIR is read from an older download where one is left on that machine.

`DistillConfig` (jobs.distill_config) holds the options, `distill(config)` runs the stages (the last, scoring, is
jobs.distill_score's); the command only maps its flags onto the config.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from jobs.console import cli_logging
from jobs.distill_config import DistillConfig, DistillError
from jobs.distill_score import echo_results, score_stage
from jobs.outdir import join, read_json, read_text, write_text
from pipeline.cluster import connect_ray
from pipeline.models import model_info
from pipeline.sources import iter_entries, sample, sample_key
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


def distill(config: DistillConfig) -> dict:
    """The five stages of the module docstring, in `config.out` (each resumed or skipped where an earlier run got
    to); returns distill.json's document. Raises DistillError for what the user can fix."""
    student_config = _student_config(config.student)
    try:
        storage = config.storage
        teacher_name = model_info(config.teacher, storage)["name"]
    except ValueError as err:
        raise DistillError(str(err)) from err
    work = _open_work(config, storage)
    stages: dict[str, float] = {}
    t0 = time.time()
    split = _sample_stage(config, work, storage)
    stages["sample_s"] = time.time() - t0
    training = _label_and_train(config, work, storage, student_config, stages)
    t0 = time.time()
    doc = score_stage(config, work, storage, split, teacher_name, training)
    stages["score_s"] = time.time() - t0
    doc["stages"] = stages
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_text(join(work, "distill.json"), json.dumps(doc, indent=2), storage)
    echo_results(doc, join(work, "distill.json"), config.card)
    return doc


def _student_config(student: str) -> dict:
    """The student's config.json, refused unless it is a LaVi's."""
    student_config = json.loads((Path(student) / "config.json").read_text())
    if "decoder" not in student_config:
        raise DistillError(f"--student {student} is not a LaVi checkpoint (its model_type is "
                           f"{student_config.get('model_type')!r}): make one with `lavi-label convert`")
    return student_config


def _open_work(config: DistillConfig, storage: dict) -> str:
    """The work directory (`join`'s spelling of --out), bound to the config's settings: made, or checked."""
    work = join(config.out)
    saved = join(work, "distill_settings.json")
    earlier = read_json(saved, storage)
    if earlier is not None and earlier != config.settings():
        raise DistillError(f"{config.out} holds a distillation with other settings ({saved}): choose another --out")
    write_text(saved, json.dumps(config.settings(), indent=2), storage)
    return work


def _manifests(work: str) -> dict[str, str]:
    return {part: join(work, "sample", f"{part}.jsonl") for part in PARTS}


def _sample_stage(config: DistillConfig, work: str, storage: dict) -> dict[str, list[dict]]:
    """[1/5] the sample, split into train and held-out: WORK/sample/{train,held_out}.jsonl, read back where an
    earlier run wrote them."""
    manifests, where = _manifests(work), join(work, "sample")
    texts = {part: read_text(m, storage) for part, m in manifests.items()}
    if all(text is not None for text in texts.values()):
        split = {part: [json.loads(line) for line in text.splitlines()] for part, text in texts.items()}
        click.echo(f"[1/5] sample: {len(split['train'])} train, {len(split['held_out'])} held-out items "
                   f"(from {where})")
        return split
    try:
        split = sample_entries(iter_entries(config.inputs, storage), config.n_sample, config.held_out, config.seed)
    except ValueError as err:
        raise DistillError(str(err)) from err
    if not split["train"] or not split["held_out"]:
        raise DistillError(f"the INPUTs hold {len(split['train']) + len(split['held_out'])} item(s): a "
                           "distillation needs at least two")
    for part, m in manifests.items():
        write_text(m, "".join(json.dumps(e, default=str) + "\n" for e in split[part]), storage)
    click.echo(f"[1/5] sample: {len(split['train'])} train, {len(split['held_out'])} held-out items -> {where}")
    return split


def _label(stage: str, manifest: str, out: str, task: str, model: str, config: DistillConfig, storage: dict,
           overwrite: bool = False) -> None:
    """One pipeline run (`lavi-label run`'s code) of `model` over a sample part, skipped where it is complete."""
    from pipeline.config import RunConfig
    from pipeline.driver import run as run_pipeline
    from pipeline.output import Output
    from pipeline.summary import format_summary

    if not overwrite and Output(out, storage).read_summary() is not None:
        click.echo(f"{stage}: {out} is complete (skipped)")
        return
    click.echo(f"{stage}: {model} -> {out}")
    run = RunConfig(inputs=(manifest,), out=out, task=task, model=model,
                    prompt=config.prompt if task == CAPTION else None,
                    questions=config.questions if task == VQA else (), overwrite=overwrite,
                    max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                    gpus_per_worker=config.gpus_per_worker, address=config.address,
                    storage_options=config.storage_options)
    click.echo(format_summary(run_pipeline(run)))


def _label_and_train(config: DistillConfig, work: str, storage: dict, student_config: dict,
                     stages: dict[str, float]) -> dict:
    """[2/5] to [4/5] on one Ray: the teacher labels both parts, the student trains on the teacher's train labels,
    the student labels the held-out part. Returns the student's train_summary.json; each stage's seconds go to
    `stages`."""
    manifests, student_dir = _manifests(work), join(work, "student")
    owned = connect_ray(config.address)  # one Ray for every labeling stage
    try:
        t0 = time.time()
        for part in PARTS:
            for task in config.tasks:
                _label(f"[2/5] teacher labels {part} ({task})", manifests[part], join(work, "teacher", part, task),
                       task, config.teacher, config, storage)
        stages["teacher_s"] = time.time() - t0

        t0 = time.time()
        training, trained = _train_student(config, work, storage, student_config)
        stages["student_s"] = time.time() - t0

        t0 = time.time()
        for task in config.tasks:  # a student trained (further) in this run labels afresh
            _label(f"[4/5] student labels held_out ({task})", manifests["held_out"],
                   join(work, "student_labels", "held_out", task), task, student_dir, config, storage,
                   overwrite=not trained)
        stages["student_labels_s"] = time.time() - t0
    finally:
        if owned:
            import ray

            ray.shutdown()
    return training


def _train_student(config: DistillConfig, work: str, storage: dict, student_config: dict) -> tuple[dict, bool]:
    """[3/5] the student trained on the teacher's ok rows of the train part (`lavi-label train`'s code) in
    WORK/student, resumed from its checkpoint there. Returns its train_summary.json, and whether it was trained to
    `config.steps` before this run (then skipped)."""
    from jobs.train import train_model

    student_dir = join(work, "student")
    state = read_json(join(student_dir, "train_state.json"), storage)
    trained = (state is not None and state["step"] >= config.steps
               and read_text(join(student_dir, "train_summary.json"), storage) is not None)
    if trained:
        click.echo(f"[3/5] student: {student_dir} is trained ({config.steps} steps; skipped)")
    else:
        click.echo(f"[3/5] student: {config.student} trained on the teacher's train labels -> {student_dir}")
        try:
            train_model(out=student_dir, init=None if state is not None else str(config.student),
                        fusion=student_config.get("fusion", "viln"),
                        data=tuple(join(work, "teacher", "train", t) for t in config.tasks), steps=config.steps,
                        lr=config.lr, warmup=config.warmup, batch_items=config.batch_items,
                        frames=str(student_config.get("default_frames", 4)), loss_per=config.loss_per,
                        seed=config.seed, checkpoint_every=config.checkpoint_every, device=config.device,
                        threads=config.threads, freeze_backbones=config.freeze_backbones,
                        storage_options=config.storage_options)
        except click.BadParameter as err:
            raise DistillError(f"the teacher's train labels cannot train the student: {err.message}") from err
    return read_json(join(student_dir, "train_summary.json"), storage), trained


@click.command("distill")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--teacher", required=True, help="The model whose labels the student learns: a LLaVA-OneVision, "
              "Qwen-VL or LaVi checkpoint directory.")
@click.option("--student", required=True, type=click.Path(exists=True, file_okay=False),
              help="The LaVi checkpoint to train (typically `lavi-label convert TEACHER --out STUDENT`).")
@click.option("--out", required=True, help="Work directory, local or object storage (s3://, gs://; resumed if it "
              "holds one).")
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
              help="fsspec option for remote INPUTs, --teacher and --out, as for `run` (repeatable).")
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
def distill_cmd(**flags) -> None:
    """Distil a LaVi on your own corpus: the teacher labels a sample, the student learns those labels, and both are
    scored on held-out items. Reruns resume."""
    cli_logging()
    try:
        distill(DistillConfig(**flags))
    except DistillError as err:
        raise click.UsageError(str(err)) from err
