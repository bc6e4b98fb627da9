"""`lavi-label report OUT`: write OUT/_report.html (pipeline.report). No logic here."""

from __future__ import annotations

import logging

import click

from pipeline.storage_options import parse_storage_options


@click.command("report")
@click.argument("out")
@click.option("--sample", default=48, show_default=True, help="Rows shown in the gallery.")
@click.option("--to", default=None, help="Write the page here instead (a path or URI), e.g. report.html.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote OUT (repeatable).")
def report_cmd(out: str, sample: int, to: str | None, storage_options: tuple[str, ...]) -> None:
    """One self-contained HTML page about an output: a gallery, errors, throughput, text lengths."""
    from pipeline.report import write_report

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uri = write_report(out, parse_storage_options(storage_options), sample=sample, to=to)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(f"report: {uri}")
