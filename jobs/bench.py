"""`lavi-label bench model|pipeline|realsize`: flags -> bench configs -> bench.model.run / bench.pipeline.run /
bench.realsize.run.

Imports nothing heavy at import time: `python -m bench model --device cuda` runs on a machine that has
torch and transformers but no ray, decord or av.
"""
from __future__ import annotations

import json
import logging

import click


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from err


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@click.group("bench")
def bench() -> None:
    """Benchmarks measured side by side in one run; each writes JSON and its BENCHMARKS.md section."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@bench.command("model")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--shapes", default="tiny-shapes", show_default=True,
              help="tiny-random, tiny-shapes, qwen2-0.5b-siglip, qwen2-7b-siglip, tiny-qwen2.5-vl, qwen2.5-vl-3b or "
                   "qwen2.5-vl-7b (CUDA) (random weights of those shapes; the Qwen ones: the Qwen in our engine and "
                   "in transformers, and a LaVi of its decoder).")
@click.option("--settings", default="", help="Visual settings, comma-separated: image, anyres, video "
              "(default: all; CPU tiny-shapes: image,video).")
@click.option("--models", default="", help="lavi, vlora, concat, hf-llava-ov, qwen-vl, hf-qwen-vl, comma-separated "
              "(default: lavi,vlora,concat, plus hf-llava-ov on CUDA, for tiny-random and qwen2-0.5b-siglip; the "
              "Qwen shapes: lavi,qwen-vl,hf-qwen-vl).")
@click.option("--visual-compress", "compress", multiple=True, metavar="dct:KEEP|fastv:KEEP[@LAYER]",
              help="Also measure each concat model with this visual token compression (repeatable; rows "
                   "concat-dct:0.25 ...): the parameter-free baselines of `run --visual-compress`.")
@click.option("--batch-sizes", default="", help="Comma-separated (default: CPU 1,8,32; CUDA 1 and the largest "
              "batch that fits, found by a probe).")
@click.option("--prompt-tokens", default=64, show_default=True)
@click.option("--new-tokens", default=48, show_default=True, help="Exactly this many per caption (EOS ignored).")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per point (the median is reported).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the decode step with CUDA graphs (default: on CUDA only).")
@click.option("--compile-backend", type=click.Choice(["inductor", "cudagraphs", "eager"]), default="inductor",
              show_default=True, help="inductor (+ CUDA graphs on CUDA), or cudagraphs alone (compiles in seconds).")
@click.option("--max-batch", default=512, show_default=True, help="The batch probe's ceiling.")
@click.option("--memory-fraction", default=0.85, show_default=True, help="The probe keeps peak memory under this.")
@click.option("--peak-tflops", type=float, default=None, help="Dense bf16 TFLOP/s for the FLOP-utilisation column "
              "(default: known from the GPU's name).")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="The weights' and activations' dtype (default: bfloat16 on CUDA, float32 on CPU; bfloat16 on a "
                   "CPU with AMX or AVX512-BF16 runs its matmuls several times faster).")
@click.option("--model", "checkpoints", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A local checkpoint directory instead of --shapes (repeatable): a LLaVA-OneVision gives concat rows "
                   "(our engine) and hf-llava-ov rows (transformers, same weights); a Qwen-VL qwen-vl and hf-qwen-vl rows; a "
                   "LaVi gives lavi rows.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also measure each lavi/concat model with its decoder's linear layers as weight-only int8 "
                   "(rows lavi-int8, concat-int8), beside the float rows.")
@click.option("--mixed", default=0, show_default=True,
              help="Also measure in-flight against static batching on this many shapes-v1 images, a caption and 4 "
                   "short answers each (the batch: the largest --batch-sizes, else 32), through --mixed-model.")
@click.option("--mixed-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="The trained LaVi checkpoint of --mixed (default: the bundled tiny-shapes).")
@click.option("--out", default="bench-model.json", show_default=True, help="JSON output path or URI.")
@click.option("--markdown", default="BENCHMARKS.md", show_default=True,
              help="Markdown file whose section this run writes ('' for none).")
def model_cmd(device, shapes, settings, models, compress, batch_sizes, prompt_tokens, new_tokens, repeats, compile_,
              compile_backend, max_batch, memory_fraction, peak_tflops, seed, dtype, checkpoints, quantize, mixed,
              mixed_model, out, markdown) -> None:
    """LaVi vs the concat baseline (and transformers' LLaVA-OneVision): captions/s, TTFT, memory, FLOPs."""
    from bench.model import ModelBenchConfig, run

    try:
        config = ModelBenchConfig(
            device=device, shapes=shapes, settings=_names(settings), models=_names(models), compress=compress,
            batch_sizes=_ints(batch_sizes), prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
            compile=compile_, compile_backend=compile_backend, max_batch=max_batch, memory_fraction=memory_fraction,
            peak_flops=peak_tflops * 1e12 if peak_tflops else None, seed=seed, dtype=dtype, checkpoints=checkpoints,
            quantize=quantize, mixed=mixed, mixed_model=mixed_model, out=out, markdown=markdown or None)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    doc = run(config)
    from bench.model_report import markdown as render

    click.echo(render(doc))
    click.echo(f"results: {out}")


@bench.command("render")
@click.argument("json_path", metavar="JSON")
@click.option("--markdown", default="BENCHMARKS.md", show_default=True)
def render_cmd(json_path, markdown) -> None:
    """Write a recorded `bench model` run's section again from its JSON, as the report writes it today (the figures
    stay the run's: a new table or target over an old run)."""
    from bench.model_report import render

    click.echo(json.dumps({"section": render(json_path, markdown), "into": markdown}))


@bench.command("pipeline")
@click.option("--images", default=200, show_default=True, help="Images in the generated shapes-v1 corpus.")
@click.option("--videos", default=0, show_default=True, help="Videos in the generated corpus.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--model", default=None,
              help="LaVi checkpoint dir (default: the bundled one, else a random tiny-shapes).")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--workdir", default=None, help="Keep the corpus and labels here (default: a temp dir, removed).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="bench-pipeline.json", show_default=True)
@click.option("--markdown", default="BENCHMARKS.md", show_default=True, help="'' for none.")
@click.option("--scale", default=None, metavar="N[,N...]",
              help="Scale mode: corpora of N images each through the pipeline with a labeler of the benchmark's own "
                   "(no model): listing, reads, decodes and commits, and the driver's memory (bench.scale).")
@click.option("--scale-batch", default=256, show_default=True, help="Scale mode: items per split task and block.")
@click.option("--resume-left", default=1000, show_default=True,
              help="Scale mode: images added to the largest corpus for the resume measurement (0: none).")
def pipeline_cmd(images, videos, batch_size, device, model, max_new_tokens, workdir, seed, out, markdown, scale,
                 scale_batch, resume_left) -> None:
    """`lavi-label run` on a generated corpus vs a plain model loop over the same decoded items; with --scale, the
    pipeline alone at corpus sizes."""
    from bench.pipeline import PipelineBenchConfig, markdown as render, run

    try:
        sizes = tuple(int(n.replace("_", "")) for n in scale.split(",")) if scale else ()
        config = PipelineBenchConfig(images=images, videos=videos, batch_size=batch_size, device=device, model=model,
                                     max_new_tokens=max_new_tokens, workdir=workdir, seed=seed, out=out,
                                     markdown=markdown or None, scale=sizes, scale_batch=scale_batch,
                                     resume_left=resume_left)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    doc = run(config)
    click.echo(render(doc))
    click.echo(json.dumps({"out": out}))


@bench.command("realsize")
@click.option("--new-tokens", default=12, show_default=True)
@click.option("--workdir", default=None, help="Keep the checkpoint, photos and labels here (default: a temp dir).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="bench-realsize.json", show_default=True)
@click.option("--markdown", default="BENCHMARKS.md", show_default=True, help="'' for none.")
def realsize_cmd(new_tokens, workdir, seed, out, markdown) -> None:
    """A LLaVA-OneVision of the 0.5B hub checkpoint's shapes (random weights) on four photos: `lavi-label run` end to
    end vs transformers' generate() on the same machine."""
    from bench.realsize import RealsizeConfig, markdown as render, run

    doc = run(RealsizeConfig(new_tokens=new_tokens, workdir=workdir, seed=seed, out=out, markdown=markdown or None))
    click.echo(render(doc))
    click.echo(json.dumps({"out": out, "ratio": doc["ratio"]}))
