"""The `lavi-label` command group."""

from __future__ import annotations

import click

from jobs.bench import bench
from jobs.convert import convert_cmd
from jobs.demo import demo_cmd
from jobs.distill import distill_cmd
from jobs.evaluate import eval_cmd
from jobs.exits import exit_hard
from jobs.manage import list_jobs, logs, status, stop
from jobs.plan import plan_cmd
from jobs.report import report_cmd
from jobs.retry import retry_cmd
from jobs.run import run
from jobs.submit import submit
from jobs.train import train_cmd


@click.group()
def main() -> None:
    """lavi-label: batch captioning and VQA of image and video corpora with LaVi, on Ray."""


main.add_command(run)
main.add_command(train_cmd, name="train")
main.add_command(eval_cmd, name="eval")
main.add_command(demo_cmd, name="demo")
main.add_command(submit)
main.add_command(bench)
main.add_command(convert_cmd, name="convert")
main.add_command(distill_cmd, name="distill")
main.add_command(retry_cmd, name="retry")
main.add_command(report_cmd, name="report")
main.add_command(plan_cmd, name="plan")
for _cmd in (status, logs, stop, list_jobs):
    main.add_command(_cmd)


def entry() -> None:
    """The `lavi-label` console script: `main`, then out of the process without the interpreter's finalisation."""
    exit_hard(main)


if __name__ == "__main__":
    entry()
