"""`lavi-label convert DIR --out LAVI_DIR`: a LaVi from a LLaVA-OneVision checkpoint (lavi.convert)."""
from __future__ import annotations

import click


@click.command("convert")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where the LaVi checkpoint goes.")
@click.option("--stages", default=4, show_default=True, help="ViT taps feeding the conditioner (evenly spaced).")
@click.option("--cond-dim", default=256, show_default=True, help="Conditioner width d_c.")
@click.option("--cond-heads", default=4, show_default=True)
@click.option("--sites", type=click.Choice(["attn", "ffn", "both"]), default="both", show_default=True,
              help="Which norms of each layer are modulated.")
@click.option("--layer-stride", default=1, show_default=True, help="Modulate every k-th layer.")
@click.option("--seed", default=0, show_default=True)
def convert_cmd(source: str, out: str, stages: int, cond_dim: int, cond_heads: int, sites: str, layer_stride: int,
                seed: int) -> None:
    """Build a LaVi from a Hugging Face LLaVA-OneVision directory: same tower, decoder, tokenizer and chat
    template, a new zero-initialised conditioner (exactly the base LLM until trained: `lavi-label train --init`)."""
    from lavi.checkpoint import CheckpointError
    from lavi.convert import convert

    try:
        model = convert(source, out, num_stages=stages, cond_dim=cond_dim, cond_heads=cond_heads, sites=sites,
                        layer_stride=layer_stride, seed=seed)
    except (CheckpointError, ValueError) as err:
        raise click.UsageError(str(err)) from err
    n = sum(p.numel() for p in model.viln.parameters())
    click.echo(f"LaVi {model.config.name} written to {out}: {model.config.num_stages} stages, "
               f"{n / 1e6:.2f}M new conditioner parameters (zero-initialised outputs)")
