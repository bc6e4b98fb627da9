"""`lavi-label run INPUT... --out URI`: flags -> RunConfig -> pipeline.driver.run. No logic here."""

from __future__ import annotations

import sys

import click

from jobs.console import cli_logging

from pipeline.config import DTYPES, RunConfig
from schemas.rows import CAPTION, TASKS


class BatchSize(click.ParamType):
    """A positive int, or "auto" (None)."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number or 'auto'", param, ctx)


BATCH = BatchSize()


def _schema_text(ctx, param, value: str | None) -> str | None:
    """--json-schema: a file's text, or the JSON itself (what `submit` forwards, so the cluster needs no file)."""
    if value is None or value.lstrip().startswith("{"):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise click.BadParameter(f"cannot read {value!r}: {err.strerror}") from None


EXECUTION_OPTIONS = [  # how a run labels, not what: `run` and `retry` take them alike
    click.option("--batch-size", type=BATCH, default="auto", show_default=True,
                  help="Rows per generation batch; auto: as many as GPU memory holds (measured at load), 32 on CPU."),
    click.option("--workers", default=1, show_default=True, help="Labeler actors (model replicas)."),
    click.option("--gpus-per-worker", default=0.0, show_default=True, help="GPUs per actor; 0 runs on CPU."),
    click.option("--cpus-per-worker", default=0.5, show_default=True,
                  help="CPUs each CPU labeler actor (--gpus-per-worker 0) asks Ray for."),
    click.option("--compile/--no-compile", "compile", default=None,
                  help="torch.compile the decode step (CUDA graphs). Default: on a GPU, not on CPU."),
    click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                  help="fsspec option for remote URIs, e.g. client_kwargs.endpoint_url=http://127.0.0.1:8333 "
                       "(repeatable; dotted keys nest; true/false and numbers are typed, credentials stay text)."),
    click.option("--address", default=None, help="Ray cluster to join (default: a local Ray on 127.0.0.1)."),
    click.option("--stall-timeout", default=300.0, show_default=True,
                  help="Seconds with no row before the driver says what the cluster has and what waits; after twice "
                       "that it exits (4) with that message, committed items kept. 0: wait forever."),
    click.option("--fetch-retries", default=3, show_default=True,
                  help="Retries of an input's read on transient errors (exponential backoff from 0.5 s, 30 s of "
                       "waiting at most); then the item is an error row of stage read, for `retry` (0: no retries)."),
    click.option("--max-rebuilds", default=3, show_default=True,
                  help="When a node, actor or object is lost mid-job, rebuild the pipeline over the items not done "
                       "yet, at most this many times (0: fail)."),
    click.option("-v", "--verbose", is_flag=True,
                  help="Show Ray's own log lines too, Ray Data's and the core worker's native ones (always in the Ray "
                       "session's logs directory)."),
    click.option("--inflight/--no-inflight", default=True, show_default=True,
                  help="In-flight batching: a row that finishes hands its cache row to a waiting request at once "
                       "(rows of one block); --no-inflight: static batches that wait for their longest row."),
]


def execution_options(command):
    for option in reversed(EXECUTION_OPTIONS):
        command = option(command)
    return command


@click.command("run")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", required=True, help="Output directory URI for the Parquet labels (path, s3://, gs://).")
@click.option("--task", type=click.Choice(TASKS), default=CAPTION, show_default=True)
@click.option("--prompt", default=None, help="Caption prompt (default: the model's prompt for the media type).")
@click.option("--question", "questions", multiple=True, help="A VQA question, asked of every item (repeatable).")
@click.option("--choices", default=None, metavar="A,B,...",
              help="Answer with exactly one of these (comma-separated, or a JSON list): the caption prompt's text, "
                   "or with --task vqa every question's answer (a manifest question may carry its own).")
@click.option("--json-schema", default=None, metavar="FILE", callback=_schema_text,
              help="Answer with JSON that validates against this JSON schema (a file, or the JSON itself); needs a "
                   "byte-level BPE tokenizer (LLaVA-OneVision's, a Qwen-VL's).")
@click.option("--model", default=None, help="A checkpoint directory, local or object storage: a LaVi, a "
              "LLaVA-OneVision, a Qwen2-VL, Qwen2.5-VL or Qwen3-VL as published (default: the bundled tiny-shapes).")
@execution_options
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--frames", type=int, default=None, help="Frames per video clip (default: the model's).")
@click.option("--clips", type=click.Choice(["fixed", "shots"]), default="fixed", show_default=True,
              help="Cut videos into clips of --clip-seconds (fixed), or where the shots change (shots: PySceneDetect's "
                   "content detector, bounded by --min-clip-seconds and --max-clip-seconds).")
@click.option("--clip-seconds", type=float, default=None,
              help="--clips fixed: cut videos into clips this long (default: one clip).")
@click.option("--max-clips", type=int, default=None, help="--clips fixed: keep the first N clips of each video.")
@click.option("--min-clip-seconds", type=float, default=None,
              help="--clips shots: shots shorter than this merge into a neighbour (default 2).")
@click.option("--max-clip-seconds", type=float, default=None,
              help="--clips shots: shots longer than this are split into equal parts (default 10).")
@click.option("--clips-per-group", type=int, default=16, show_default=True,
              help="Clips per clip group: a long video is decoded a group per task (its frames are what a task "
                   "holds) and committed a group at a time.")
@click.option("--decode-batch-size", type=int, default=32, show_default=True,
              help="Items per split task: their images are read and decoded together in one task (a video's clip "
                   "groups each in a task of their own).")
@click.option("--decode-workers", type=int, default=None,
              help="At most this many read/decode tasks at once (default: as many as the cluster's CPUs allow).")
@click.option("--max-bytes", type=int, default=None,
              help="Refuse inputs bigger than this many bytes (an error row of stage read). Default: no limit; videos "
                   "are read by range requests, never whole.")
@click.option("--overwrite", is_flag=True, help="Delete existing labels in --out first (default: resume).")
@click.option("--max-error-rate", default=1.0, show_default=True, help="Exit non-zero above this fraction of error rows.")
@click.option("--job-id", default=None, help="Job id written to every row (default: the output's, or a new one).")
@click.option("--rows-per-file", default=5000, show_default=True,
              help="At most this many rows per committed Parquet file (a labeler block is committed as it comes: "
                   "a file per block, or more for a block over this).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="int8: the decoder's linear layers as weight-only int8 at load (a quarter of their memory; faster "
                   "decode steps at small batches).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
              show_default=True,
              help="What the labelers compute in. auto: bf16 on a GPU; on a CPU the checkpoint's own dtype where the "
                   "CPU computes bf16 natively (AMX, AVX512-BF16), else float32. float32: transformers' float32 texts "
                   "(slower); float16: GPUs without bf16 (T4, V100).")
@click.option("--visual-compress", default=None, metavar="dct:KEEP|fastv:KEEP[@LAYER]",
              help="Models with their visual tokens in the context (LLaVA-OneVision, Qwen-VL: fastv only, a concat "
                   "LaVi): fewer of them, no training. "
                   "dct:KEEP low-passes each frame's token grid to KEEP of its tokens (Fourier-VLM); "
                   "fastv:KEEP@LAYER keeps the KEEP most attended visual tokens past decoder layer LAYER (FastV).")
@click.option("--report/--no-report", "report", default=True, show_default=True,
              help="Write OUT/_report.html at the end (a gallery of a sample of rows, errors, throughput).")
def run(inputs: tuple[str, ...], report: bool, **flags) -> None:
    """Caption or question images and videos into Parquet, on Ray. Reruns resume."""
    from pipeline.recovery import PipelineStalled
    from pipeline.driver import run as run_pipeline
    from pipeline.summary import format_summary

    cli_logging(verbose=flags["verbose"])
    try:
        config = RunConfig(inputs=inputs, **flags)
        if config.model is None:
            click.echo("note: the bundled model, tiny-shapes, knows only shapes-v1 (synthetic coloured shapes): on "
                       "real photos or videos it writes shape words. For real labels pass --model DIR, a "
                       "Qwen-VL or LLaVA-OneVision checkpoint (see the README) or a LaVi distilled from one.", err=True)
        summary = run_pipeline(config)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    except PipelineStalled as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(4)
    click.echo(format_summary(summary))
    click.echo(f"labels: {config.out}")
    if report:
        _report(config)
    if summary["error_rate_exceeded"]:
        click.echo(f"error rate {summary['error_rate']:.1%} is above --max-error-rate {config.max_error_rate:.1%}",
                   err=True)
        sys.exit(3)


def _report(config: RunConfig) -> None:
    """The report is for looking at the labels: one that cannot be made costs a warning, never the run."""
    from pipeline.report import write_report

    try:
        click.echo(f"report: {write_report(config.out, config.storage)}")
    except Exception as err:  # noqa: BLE001 - the labels are written; say why there is no page
        click.echo(f"warning: no _report.html ({type(err).__name__}: {err}); try `lavi-label report {config.out}`",
                   err=True)


if __name__ == "__main__":  # `python -m jobs.run ...`: the same command without the other subcommands' imports
    from jobs.exits import exit_hard

    exit_hard(run)
