"""transformers' rows of `bench model`: `LlavaOnevisionForConditionalGeneration.generate()` timed beside the
engine's rows, at the run's synthetic shapes (`bench_shapes`) or on a checkpoint directory's weights
(`bench.checkpoints`, through `measure`). `runner` is the run's `bench.model.Runner`."""
from __future__ import annotations

import torch

from bench import flops as F
from bench import hf
from bench.configs import Setting, model_config
from bench.model_config import FUSION
from bench.report import versions


def measure(runner, model, kwargs: dict) -> dict:
    """One point of transformers' generate(): a warm-up, then one timed run of exactly new_tokens per row."""
    b, n = kwargs["input_ids"].shape[0], runner.c.new_tokens
    if runner.device.type == "cuda" or runner._cold(model):
        hf.timed_generate(model, kwargs, 2)
    runner.mem.reset()
    ttft, total = hf.timed_generate(model, kwargs, n)
    return {"batch_size": b, "captions_per_s": b / total, "ttft_s": ttft,
            "decode_tokens_per_s": b * (n - 1) / max(total - ttft, 1e-9), "peak_mem_bytes": runner.mem.peak(),
            "total_s": total}


def bench_shapes(runner, setting: Setting) -> tuple[list[dict], str | None]:
    """transformers' rows at one synthetic setting: its own model of the run's shapes, at each batch size (CUDA: the
    probe's), or the reason there are none (a skip the run records)."""
    c = runner.c
    if c.shapes not in ("qwen2-0.5b-siglip", "qwen2-7b-siglip", "tiny-random"):
        return [], f"hf-llava-ov is built for qwen2-0.5b-siglip, qwen2-7b-siglip and tiny-random, not {c.shapes}"
    runner.mem.rebase()

    # transformers' API moves between releases: an incompatible version is a recorded skip, so the
    # LaVi and concat figures of the same run are still written
    try:
        model = hf.build(c.shapes, setting, runner.device, runner.dtype, seed=c.seed)
        one = hf.inputs(model, setting, 1, c.prompt_tokens, seed=c.seed)[0]  # a row: its FLOPs and context
        counted = hf.prefill_flops(model, one)
    except (ImportError, TypeError, ValueError) as err:
        runner._release()
        return [], f"transformers {versions().get('transformers')}: {type(err).__name__}: {str(err)[:300]}"

    def try_batch(b: int) -> None:
        hf.timed_generate(model, hf.inputs(model, setting, b, c.prompt_tokens, seed=c.seed)[0], 2)

    probe = runner.probe(try_batch)
    sizes = runner._sizes(probe, [1, 4] if c.shapes == "qwen2-0.5b-siglip" else [1, 8])
    # a caption: the counted prefill and the decode steps over its growing cache (the decoder's shapes are the
    # engine's concat model's), so its rows get a FLOP bound and utilisation like the engine's
    caption = counted + F.growing_decode_flops(model_config(c.shapes, FUSION["concat"], setting),
                                               one["input_ids"].shape[1], c.new_tokens)
    rows = []
    for b in sizes:
        kwargs, nv = hf.inputs(model, setting, b, c.prompt_tokens, seed=c.seed)
        try:
            timed = measure(runner, model, kwargs)
        except torch.cuda.OutOfMemoryError as err:
            rows.append({"model": "hf-llava-ov", "setting": setting.name, "batch_size": b,
                         "error": f"OutOfMemoryError: {str(err)[:200]}"})
            runner._release()
            break
        rows.append({"model": "hf-llava-ov", "shapes": c.shapes, "setting": setting.name,
                     "frames": setting.frames, "visual_tokens": nv, "prompt_tokens": c.prompt_tokens,
                     "new_tokens": c.new_tokens, "dtype": str(runner.dtype).removeprefix("torch."),
                     "generator": "transformers generate()", **timed, "prefill_flops": counted,
                     "caption_flops": caption, **runner._utilization(timed, counted, caption),
                     **({"probe": probe} if probe else {})})
    del model
    runner._release()
    return rows, None
