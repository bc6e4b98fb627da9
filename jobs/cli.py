"""The `lavi-label` command group."""

from __future__ import annotations

import click

from jobs.run import run
from jobs.train import train_cmd


@click.group()
def main() -> None:
    """lavi-label: batch captioning and VQA of image and video corpora with LaVi, on Ray."""


main.add_command(run)
main.add_command(train_cmd, name="train")

if __name__ == "__main__":
    main()
