"""`lavi-label plan INPUT... [--sample N] [run options]`: a forecast of a run (pipeline.plan). No logic here."""

from __future__ import annotations

import json
import logging

import click

from jobs.console import cli_logging

from jobs.run import run as run_command

# the options that decide what a run costs; where it writes and how it resumes do not
_NOT_HERE = ("out", "overwrite", "job_id", "rows_per_file", "max_error_rate", "report")


@click.command("plan")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--sample", "sample_items", default=64, show_default=True, help="Items labelled to measure the rates.")
@click.option("--sample-seed", default=0, show_default=True, help="Which items the sample takes.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the figures here too.")
def plan_cmd(inputs: tuple[str, ...], sample_items: int, sample_seed: int, json_out: str | None, **options) -> None:
    """Count the corpus, label a sample with the run's settings, and forecast rows, tokens, wall time, GPU-hours."""
    from pipeline.config import RunConfig
    from pipeline.plan import format_plan, plan

    cli_logging(logging.WARNING, verbose=options["verbose"])
    try:
        config = RunConfig(inputs=inputs, out="(plan)", **options)
        if sample_items < 1:
            raise ValueError(f"--sample must be >= 1, got {sample_items}")
        figures = plan(config, sample_items, sample_seed)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(format_plan(figures))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(figures, f, indent=2)


plan_cmd.params.extend(p for p in run_command.params if p.name not in ("inputs", *_NOT_HERE))
