"""The batch-1 decode step against the weights-read roofline, and where its time beyond goes.

A step at batch 1 reads every weight it multiplies by once, and each row's state (its KV cache slots; ViLN's
K/U; VLoRA's factors): those bytes over the machine's copy bandwidth are the roofline. Beside the measured step,
the step's linear layers alone, back to back on one row (`linears_step_s`): the time the matrix-vector products
take at the rate their kernels read weights. So a step's excess splits into two causes: `linears / roofline`
above 1 is the kernels reading weights below the copy bandwidth; `rest s` (measured - linears) is everything
else a step runs (attention over the cache and ViLN's K/U, norms, rotary, the small ops between them).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from bench.configs import Setting
from lavi.cpu_pack import PackedLinear
from lavi.vlora import weight_shapes


def state_bytes(config, setting: Setting, max_seq: int, kind: str, dtype: torch.dtype) -> int:
    """Bytes of one row's state a decode step reads: the static KV cache (all its slots), plus ViLN's K/U at every
    modulated site or VLoRA's factors at every (weight type, modulated layer)."""
    d = config.decoder
    elt = torch.finfo(dtype).bits // 8
    state = d.num_layers * 2 * d.num_kv_heads * max_seq * d.head_dim * elt
    if kind == "lavi":
        sites = len(config.modulated_layers()) * len(config.site_names())
        state += sites * 2 * setting.visual_tokens(config.vision.patch_size) * config.cond_dim * elt
    if kind == "vlora":
        shapes = weight_shapes(config)
        state += len(config.modulated_layers()) * sum(shapes[t][0] for t in config.lora_types) * config.lora_rank * elt
    return state


def step_linears(model) -> list[nn.Module]:
    """The linear products one decode step runs: the decoder's layers and its output head, and ViLN's site heads."""
    parts = [model.decoder.layers, model.decoder.lm_head] + ([model.viln.heads] if model.viln is not None else [])
    return [m for part in parts for m in part.modules() if isinstance(m, (nn.Linear, PackedLinear))]


@torch.inference_mode()
def linears_step_s(model, repeats: int = 5) -> float:
    """Seconds for every linear product of a decode step, one row each, back to back (the best of `repeats`)."""
    layers = step_linears(model)
    device, dtype = model.device, model.dtype
    inputs = [torch.randn(1, 1, m.in_features, device=device, dtype=dtype) for m in layers]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the kernels up
        sync()
        start = time.perf_counter()
        for m, x in zip(layers, inputs):
            m(x)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def linears_bytes(model) -> int:
    """Bytes of the weight matrices `step_linears` multiply by."""
    elt = torch.finfo(model.dtype).bits // 8
    return sum(m.in_features * m.out_features * elt for m in step_linears(model))


def entry(kind: str, setting: Setting, weights: int, state: int, measured_s: float, linears: tuple[float, int]) -> dict:
    """linears: (`linears_step_s`, `linears_bytes`) of the model."""
    return {"model": kind, "setting": setting.name, "weight_bytes_per_step": weights, "state_bytes_per_step": state,
            "measured_step_s": measured_s, "linears_step_s": linears[0], "linears_weight_bytes": linears[1]}


def finish(roofline: list[dict], bandwidth: float) -> None:
    """Each entry's roofline at `bandwidth` (bytes/s), and the measured step and its linears against it."""
    for roof in roofline:
        roof["roofline_step_s"] = (roof["weight_bytes_per_step"] + roof["state_bytes_per_step"]) / bandwidth
        roof["measured_over_roofline"] = roof["measured_step_s"] / roof["roofline_step_s"]
        if roof.get("linears_step_s") is not None:
            roof["linears_over_roofline"] = roof["linears_step_s"] / roof["roofline_step_s"]
            roof["rest_step_s"] = roof["measured_step_s"] - roof["linears_step_s"]
            roof["linears_read_bytes_per_s"] = roof["linears_weight_bytes"] / roof["linears_step_s"]
