"""Weight-only int8 for the decoder's linear layers, quantised at load (nothing quantised is saved).

Per output channel, symmetric: W ~= scale[:, None] * q, q int8 in [-127, 127], scale = max |W[row]| / 127. The
matmul is torch's `_weight_int8pack_mm` (the kernel torchao's int8 weight-only path calls on CPU) with bf16
activations: on CPU its fp32-activation path is slower than the float matmul, its bf16 one faster at the batch
sizes a decode step has (one 4864 x 896 layer, 1 thread: batch 1 0.28 ms against fp32's 1.1 ms; batch 32 4.7
against 6.2; batch 256 even), because a decode step is bound by reading the weights, which int8 quarters.
The layer's output goes back to the activations' dtype; norms, attention, embeddings and the vision tower stay
as they were.
"""
from __future__ import annotations

import torch
from torch import nn
from torch import Tensor

MODES = ("int8",)


class Int8Linear(nn.Module):
    """An nn.Linear's weight as per-channel int8 and bf16 scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scale.float()[:, None]


def quantize(model: nn.Module, mode: str = "int8") -> int:
    """Replace the linear layers of `model.decoder` (attention, MLP and the output head) by their int8 form, in
    place; returns how many were replaced."""
    if mode not in MODES:
        raise ValueError(f"quantize: one of {MODES}, got {mode!r}")
    targets = [(parent, name, child) for parent in model.decoder.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    return len(targets)
