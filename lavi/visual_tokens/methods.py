"""Fewer visual tokens for the concat path, with no training: the efficient-VLM baselines LaVi is measured against.

- `dct:KEEP` (Fourier-VLM style, `lavi.visual_tokens.dct`): each frame's (or tile's) grid of projected visual tokens, h x w of width d, is
  low-pass filtered with a 2D DCT: its lowest R x R coefficients (R = round(side * sqrt(KEEP))) become an R x R grid
  of tokens again (the inverse DCT of those, scaled so that a constant grid stays that constant).
- `fastv:KEEP[@LAYER]` (FastV style): the prompt runs whole through decoder layers 0..LAYER (default 2); there, each
  row keeps the KEEP fraction of its visual tokens that receive the most attention from its last prompt token
  (mean over heads), and layers past LAYER see only those, in the prefill and in every decode step
  (`lavi.visual_tokens.fastv`).

KEEP 1.0 is the unmodified model exactly (nothing is transformed or dropped). Torch-free: the driver parses and
checks a run's spelling; the work is in lavi.visual_tokens.dct and lavi.visual_tokens.fastv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DCT, FASTV = "dct", "fastv"
METHODS = (DCT, FASTV)


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
            if method == DCT and layer:
                raise ValueError("dct takes no @LAYER")
            return cls(method, float(keep), int(layer) if layer else 2)
        except ValueError as err:
            raise ValueError(f"--visual-compress {text!r}: {err} (spell it dct:KEEP or fastv:KEEP[@LAYER], KEEP the "
                             "fraction of visual tokens kept, e.g. dct:0.25, fastv:0.5@2)") from None

    def spelled(self) -> str:
        return f"{DCT}:{self.keep:g}" if self.method == DCT else f"{FASTV}:{self.keep:g}@{self.layer}"

    @property
    def is_identity(self) -> bool:
        return self.keep >= 1.0

    @property
    def lowpass(self) -> bool:
        """dct below 1.0: each grid of visual tokens is low-passed to a smaller one (lavi.visual_tokens.dct)."""
        return self.method == DCT and not self.is_identity

    @property
    def prunes(self) -> bool:
        """fastv below 1.0: the decoder drops visual tokens past its layer (lavi.visual_tokens.fastv)."""
        return self.method == FASTV and not self.is_identity

    def grid_side(self, side: int) -> int:
        """The side a side x side grid of visual tokens keeps: dct's R (`side`), any other method's whole side."""
        return self.side(side) if self.method == DCT else side

    def side(self, side: int) -> int:
        """dct: the side R of the kept R x R grid of a side x side one."""
        return side if self.is_identity else max(1, min(side, round(side * math.sqrt(self.keep))))

    def kept(self, n: int) -> int:
        """fastv: how many of a row's n visual tokens it keeps (at least one)."""
        return n if self.is_identity else max(1, min(n, math.ceil(self.keep * n)))


def checked(compress: "str | VisualCompress", name: str, kind: str, methods: tuple[str, ...] | None,
            in_context: bool) -> VisualCompress:
    """`compress` parsed, refused (ValueError, one line) where the model `name` (a `kind` model) does not take it:
    `methods` the ones it takes (None: every method where its visual tokens are in its context, none otherwise)."""
    vc = VisualCompress.parse(compress) if isinstance(compress, str) else compress
    methods = (METHODS if in_context else ()) if methods is None else methods
    if not methods:
        raise ValueError(f"--visual-compress {vc.spelled()} thins the visual tokens in a concat model's context; "
                         f"{name} is a {kind} model, with none there")
    if vc.method not in methods:
        raise ValueError(f"--visual-compress {vc.spelled()}: {name} (a {kind} model) takes "
                         f"{' or '.join(m + ':KEEP' + ('[@LAYER]' if m == FASTV else '') for m in methods)} only")
    return vc
