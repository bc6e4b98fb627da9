"""Fewer visual tokens for the concat path, with no training: the efficient-VLM baselines LaVi is measured against.

- `dct:KEEP` (Fourier-VLM style): each frame's (or tile's) grid of projected visual tokens, h x w of width d, is
  low-pass filtered with a 2D DCT: its lowest R x R coefficients (R = round(side * sqrt(KEEP))) become an R x R grid
  of tokens again (the inverse DCT of those, scaled so that a constant grid stays that constant).
- `fastv:KEEP[@LAYER]` (FastV style): the prompt runs whole through decoder layers 0..LAYER (default 2); there, each
  row keeps the KEEP fraction of its visual tokens that receive the most attention from its last prompt token
  (mean over heads), and layers past LAYER see only those, in the prefill and in every decode step
  (`lavi.fastv`).

KEEP 1.0 is the unmodified model exactly (nothing is transformed or dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

METHODS = ("dct", "fastv")


@dataclass(frozen=True)
class VisualCompress:
    method: str
    keep: float  # the fraction of visual tokens kept, (0, 1]
    layer: int = 2  # fastv: the last decoder layer that sees every visual token

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"visual compression must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"the kept fraction of visual tokens must be in (0, 1], got {self.keep}")
        if self.layer < 0:
            raise ValueError(f"the FastV layer must be >= 0, got {self.layer}")

    @classmethod
    def parse(cls, text: str) -> "VisualCompress":
        """`dct:0.25`, `fastv:0.5` or `fastv:0.5@2`."""
        method, _, rest = text.partition(":")
        keep, _, layer = rest.partition("@")
        try:
            if method == "dct" and layer:
                raise ValueError("dct takes no @LAYER")
            return cls(method, float(keep), int(layer) if layer else 2)
        except ValueError as err:
            raise ValueError(f"--visual-compress {text!r}: {err} (spell it dct:KEEP or fastv:KEEP[@LAYER], KEEP the "
                             "fraction of visual tokens kept, e.g. dct:0.25, fastv:0.5@2)") from None

    def spelled(self) -> str:
        return f"dct:{self.keep:g}" if self.method == "dct" else f"fastv:{self.keep:g}@{self.layer}"

    @property
    def is_identity(self) -> bool:
        return self.keep >= 1.0

    def side(self, side: int) -> int:
        """dct: the side R of the kept R x R grid of a side x side one."""
        return side if self.is_identity else max(1, min(side, round(side * math.sqrt(self.keep))))

    def kept(self, n: int) -> int:
        """fastv: how many of a row's n visual tokens it keeps (at least one)."""
        return n if self.is_identity else max(1, min(n, math.ceil(self.keep * n)))


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II matrix C (n, n): X = C x, x = C^T X."""
    i = torch.arange(n, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)  # (k, i)
    c[0] /= math.sqrt(2)
    return c.to(dtype=dtype, device=device)


def dct_lowpass(grid: Tensor, r: int) -> Tensor:
    """grid (..., h, w, d) -> (..., r, r, d): the lowest r x r coefficients of its 2D DCT over (h, w), brought back
    to an r x r grid by the inverse DCT of that size, scaled by sqrt(r*r / (h*w)) so that a constant grid stays
    that constant (the DC coefficient grows with the grid's size)."""
    h, w = grid.shape[-3], grid.shape[-2]
    x = grid.float()
    ch, cw = dct_matrix(h, device=grid.device)[:r], dct_matrix(w, device=grid.device)[:r]  # (r, h), (r, w)
    coeffs = torch.einsum("ah,...hwd,bw->...abd", ch, x, cw)  # (..., r, r, d): the low-frequency corner
    back = dct_matrix(r, device=grid.device)  # (r, r)
    y = torch.einsum("ai,...abd,bj->...ijd", back, coeffs, back) * math.sqrt(r * r / (h * w))
    return y.to(grid.dtype)
