"""Linear layers as oneDNN-packed weights, for CPU inference in float32, and in bfloat16 where the CPU computes it
natively (packed at load, never saved).

A decode step on a CPU is one row (or a few) through every weight matrix, and torch's plain `F.linear` runs
those thin products well under what the memory system gives: measured on this project's 2-core EPYC, 60
Qwen2-0.5B MLP matrices (4864 x 896, 1 GB, past the last-level cache), fp32, 2 threads, the best of three:

    rows per product     1          4          64          793 (a prefill)
    F.linear          85 ms      131 ms      115 ms*      822 ms*
    oneDNN packed     35 ms       40 ms       56 ms*      715 ms*     (* 20 matrices)

Small layers stay as they are: a packed product's fixed cost is ~30-50 us a call against a few us for a
128 x 128 `F.linear`, so a 3 MB model (tiny-shapes: all its layers under 50k weights) would run 3-4x slower packed
(measured: its batch-1 decode step 0.9 -> 3.4 ms). Only layers of at least MIN_ELEMENTS weights are packed; at
Qwen2-0.5B shapes the measured crossover at one row is ~300k (896 x 256: 75 us plain, 80 packed; 1792 x 256: 273
against 111).

In bfloat16 on a CPU with AMX (this project's 2-core Xeon, its L2 and L3 small beside the weights), 12 Qwen2.5-3B
MLP matrices (11008 x 2048, 540 MB), 2 threads, the best of five; the outputs bit-identical to F.linear's:

    rows per product     1          4          16         322 (a prefill)   1288
    F.linear          30.0 ms    30.7 ms    33.3 ms    58.1 ms*          204 ms*
    oneDNN packed     25.1 ms    25.5 ms    26.0 ms    44.9 ms*          145 ms*     (* 4 matrices)

The packed form is oneDNN's own blocked layout of the same weight (`mkldnn._reorder_linear_weight`, the
layout torch.compile's CPU freezing pass uses), so results differ from `F.linear` by summation order only
(measured: 5e-5 at outputs of size ~30, fp32 rounding). It has no autograd and no device but the CPU: it is for
an engine's own model, loaded for inference (`lavi.serving.load_prep`), not for one being trained.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


MIN_ELEMENTS = 1 << 18  # 262,144 weights: a layer smaller than this is left to F.linear


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it oneDNN converts every product, and
    a bf16 linear runs ~4x slower than a float32 one (measured on this project's 2-core Xeon, AVX-512 without BF16:
    a SigLIP-so400m MLP product over 13 anyres tiles, 1.40 s in bf16 against 0.34 s in float32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_dtype() -> torch.dtype | None:
    """The dtype a CPU labeler computes in: float32 where bf16 is not native (a bf16 checkpoint is upcast once, at
    load, and its linear layers are then packed), None (the checkpoint's own) where it is."""
    return None if native_bf16() else torch.float32


def packable(dtype: torch.dtype) -> bool:
    """Whether a CPU layer in `dtype` is packed: float32 always, bfloat16 where this CPU computes it natively."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16())


def weight_count(model: nn.Module) -> int:
    """The model's weights, whatever holds them: its parameters, its buffers (int8 weights: lavi.serving.quant) and
    its packed products (a PackedLinear's weight is a plain attribute: a packed 3B model has ~0.3M parameters)."""
    held = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    return held + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))


def available() -> bool:
    """Whether this torch has oneDNN's packed linear (x86 builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is held in oneDNN's packed layout (a plain attribute: not in state_dict)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn-packed"


# products that read the same input, packed as one (a module's attribute for them, and its layers by name): one
# call and one wide product instead of three or two thin ones; at Qwen2-0.5B shapes k and v alone are under
# MIN_ELEMENTS and would stay plain
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def _fuse(model: nn.Module, least: int) -> int:
    """Each module with a FUSED attribute set to None and `packable` CPU nn.Linear layers of those names gets them
    as one packed product (their outputs side by side, in that order) in their place; returns how many."""
    n = 0
    for module in list(model.modules()):
        for attr, names in FUSED.items():
            parts = [getattr(module, name, None) for name in names]
            if getattr(module, attr, False) is not None or not all(
                    type(p) is nn.Linear and p.weight.device.type == "cpu" and packable(p.weight.dtype)
                    for p in parts) or sum(p.weight.numel() for p in parts) < least \
                    or len({p.bias is None for p in parts}) > 1:  # all with a bias or none
                continue
            whole = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                              device="meta")
            whole.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
            if whole.bias is not None:
                whole.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
            setattr(module, attr, PackedLinear(whole))
            for name in names:
                delattr(module, name)
            n += 1
    return n


def pack(model: nn.Module, min_elements: int | None = None) -> int:
    """Replace every `packable` CPU nn.Linear of `model` (float32; bfloat16 where native) with at least `min_elements` weights (None: MIN_ELEMENTS)
    by its packed form, in place, those that read the same input (FUSED) as one; returns how many packed
    products there are now."""
    least = MIN_ELEMENTS if min_elements is None else min_elements
    fused = _fuse(model, least)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"
               and packable(child.weight.dtype) and child.weight.numel() >= least]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return fused + len(targets)
