"""The batch-1 decode step against the weights-read roofline, and where its time beyond goes.

A step at batch 1 reads every weight it multiplies by once, and each row's state (its KV cache slots; ViLN's
K/U; VLoRA's factors): those bytes over the machine's copy bandwidth are the roofline. Beside the measured step,
the step alone and its linear layers alone, back to back on one row, measured in turns (`step_alone`): the
time the matrix-vector products take at the rate their kernels read weights, and the whole step in the same
moments (the run's own step is one generation's mean, on a shared machine whose load moves). So a step's excess
splits into two causes: `linears / roofline` above 1 is the kernels reading weights below the copy bandwidth;
`rest s` (step alone - linears) is everything else a step runs (attention over the cache and ViLN's K/U, norms,
rotary, the small ops between them).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bench.configs import Setting
from bench.memory import best_s, timed_s
from lavi.serving.cpu_pack import PackedLinear
from lavi.core.fusion import Visual
from lavi.serving.steps import decode_rows, prunes_visual, setup_caches
from lavi.core.vlora import weight_shapes


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


def _linears_pass(model) -> Callable[[], None]:
    layers = step_linears(model)
    inputs = [torch.randn(1, 1, m.in_features, device=model.device, dtype=model.dtype) for m in layers]

    def run() -> None:
        for m, x in zip(layers, inputs):
            m(x)
    return run


@torch.inference_mode()
def linears_step_s(model, repeats: int = 5) -> float:
    """Seconds for every linear product of a decode step, one row each, back to back (the best of `repeats`)."""
    return best_s(_linears_pass(model), model.device, repeats)


@torch.inference_mode()
def step_alone(model, vis: Visual, max_seq: int, new_tokens: int, rounds: int = 5, steps: int = 3
               ) -> tuple[float, float]:
    """The eager batch-1 decode step alone and its linear layers alone, measured in turns (`rounds` times, the best
    of each kept) so that both see the machine as it is then: -> (step_s, linears_s). vis: one row's visual state;
    the step writes the slot halfway through `new_tokens` past a context of max_seq - new_tokens (values do not
    matter to its time, shapes do)."""
    cache = setup_caches(model, 1, max_seq)
    at = max_seq - new_tokens + new_tokens // 2
    slot_valid = torch.zeros(1, max_seq, dtype=torch.bool, device=model.device)
    slot_valid[:, : at + 1] = True
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    pos, slot = torch.full((1, 1), at, device=model.device), torch.full((1, 1), at, device=model.device)
    deep = slot_valid.clone() if prunes_visual(model) else None

    def step() -> None:
        for _ in range(steps):
            decode_rows(model, cache, tok, pos, slot_valid, slot, vis.mask, vis.cond_kv or (), vis.factors or (), deep)
    linears = _linears_pass(model)
    step(), linears()  # warm
    best_step = best_linears = float("inf")
    for _ in range(rounds):
        best_step = min(best_step, timed_s(step, model.device) / steps)
        best_linears = min(best_linears, timed_s(linears, model.device))
    return best_step, best_linears


def linears_bytes(model) -> int:
    """Bytes of the weight matrices `step_linears` multiply by."""
    elt = torch.finfo(model.dtype).bits // 8
    return sum(m.in_features * m.out_features * elt for m in step_linears(model))


def entry(kind: str, setting: Setting, weights: int, state: int, measured_s: float, linears_s: float,
          linears_weight_bytes: int, alone_s: float | None) -> dict:
    """measured_s: the step in the run's generation; alone_s: `step_alone`'s (None where it was not taken: a
    compiled step), linears_s beside it."""
    return {"model": kind, "setting": setting.name, "weight_bytes_per_step": weights, "state_bytes_per_step": state,
            "measured_step_s": measured_s, "step_alone_s": alone_s, "linears_step_s": linears_s,
            "linears_weight_bytes": linears_weight_bytes}


def finish(roofline: list[dict], bandwidth: float) -> None:
    """Each entry's roofline at `bandwidth` (bytes/s), and the measured step and its linears against it."""
    for roof in roofline:
        roof["roofline_step_s"] = (roof["weight_bytes_per_step"] + roof["state_bytes_per_step"]) / bandwidth
        roof["measured_over_roofline"] = roof["measured_step_s"] / roof["roofline_step_s"]
        if roof.get("step_alone_s") is not None:
            roof["step_alone_over_roofline"] = roof["step_alone_s"] / roof["roofline_step_s"]
        if roof.get("linears_step_s") is not None:
            roof["linears_over_roofline"] = roof["linears_step_s"] / roof["roofline_step_s"]
            roof["rest_step_s"] = (roof.get("step_alone_s") or roof["measured_step_s"]) - roof["linears_step_s"]
            roof["linears_read_bytes_per_s"] = roof["linears_weight_bytes"] / roof["linears_step_s"]
