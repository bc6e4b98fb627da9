"""`lavi-label convert DIR --out LAVI_DIR`: a LaVi from a LLaVA-OneVision (lavi.onevision.convert) or a Qwen2-VL,
Qwen2.5-VL or Qwen3-VL checkpoint (lavi.qwenvl.convert): whichever family's CONVERT the registry finds for DIR.

--out may be object storage (s3://, gs://): the checkpoint is written to a local temporary directory and uploaded
when it is whole (jobs.outdir.staged)."""
from __future__ import annotations

import click


@click.command("convert")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, help="Where the LaVi checkpoint goes: a directory or an object-storage URI "
              "(s3://, gs://).")
@click.option("--stages", default=4, show_default=True, help="ViT taps feeding the conditioner (evenly spaced).")
@click.option("--cond-dim", default=256, show_default=True, help="Conditioner width d_c.")
@click.option("--cond-heads", default=4, show_default=True)
@click.option("--sites", type=click.Choice(["attn", "ffn", "both"]), default="both", show_default=True,
              help="Which norms of each layer are modulated.")
@click.option("--layer-stride", default=1, show_default=True, help="Modulate every k-th layer.")
@click.option("--seed", default=0, show_default=True)
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote --out, as for `run` (repeatable).")
def convert_cmd(source: str, out: str, stages: int, cond_dim: int, cond_heads: int, sites: str, layer_stride: int,
                seed: int, storage_options: tuple[str, ...]) -> None:
    """Build a LaVi from a Hugging Face LLaVA-OneVision or Qwen-VL directory: same tower, decoder, tokenizer and chat
    template, a new zero-initialised conditioner (exactly the base LLM until trained: `lavi-label train --init`)."""
    from jobs.outdir import staged
    from lavi.families import FAMILIES, CheckpointError, family_at
    from pipeline.storage_options import parse_storage_options

    try:
        family = family_at(source)
        if family.convert is None:
            takes = " or ".join(f.title for f in FAMILIES if f.convert is not None)
            raise CheckpointError(f"{source} is {family.title}: convert makes a LaVi from {takes}")
        with staged(out, parse_storage_options(storage_options), prefix="lavi-convert-") as stage:
            model = family.convert(source, stage.dir, num_stages=stages, cond_dim=cond_dim, cond_heads=cond_heads,
                                   sites=sites, layer_stride=layer_stride, seed=seed)
    except (CheckpointError, ValueError) as err:
        raise click.UsageError(str(err)) from err
    n = sum(p.numel() for p in model.viln.parameters())
    click.echo(f"LaVi {model.config.name} written to {out}: {model.config.num_stages} stages, "
               f"{n / 1e6:.2f}M new conditioner parameters (zero-initialised outputs)")
