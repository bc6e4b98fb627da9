"""`lavi-label bench model`'s configuration: the options of one run, checked; the defaults they resolve to on a
device; and the FLOP/s the utilisation columns divide by."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.configs import QWEN_SHAPES, SHAPES, Setting, settings
from bench.memory import best_s
from lavi.visual_tokens.methods import VisualCompress

MODELS = ("lavi", "vlora", "concat", "hf-llava-ov", "qwen-vl", "hf-qwen-vl")  # the Qwen's two: bench.qwen
FUSION = {"lavi": "viln", "vlora": "vlora", "concat": "concat"}
CHECKPOINT_SETTINGS = ("image", "anyres", "video")  # the settings of checkpoint directories (bench.checkpoints)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


@dataclass(frozen=True)
class ModelBenchConfig:
    """One `bench model` run. Empty tuples mean: the default for the device (see `resolve`)."""

    device: str = "cpu"
    shapes: str = "tiny-shapes"
    settings: tuple[str, ...] = ()  # image, anyres, video (empty: all of the shapes' settings)
    models: tuple[str, ...] = ()  # empty: lavi, vlora, concat (+ hf-llava-ov on CUDA, tiny-random, qwen2-0.5b)
    compress: tuple[str, ...] = ()  # each concat model also measured with these (lavi.visual_tokens.methods: dct:K, fastv:K@L)
    batch_sizes: tuple[int, ...] = ()  # empty: CPU 1, 8, 32; CUDA 1 and the largest that fits (probed)
    prompt_tokens: int = 64
    new_tokens: int = 48
    repeats: int = 3
    compile: bool | None = None  # None: on CUDA only
    compile_backend: str = "inductor"  # inductor (+ CUDA graphs on CUDA) or cudagraphs (no codegen: compiles fast)
    max_batch: int = 512  # the probe's ceiling
    memory_fraction: float = 0.85  # the probe keeps peak memory under this share of the device
    peak_flops: float | None = None  # dense bf16 FLOP/s for the utilisation column (None: by device name)
    seed: int = 0
    dtype: str | None = None  # float32 or bfloat16 (None: bfloat16 on CUDA, float32 on CPU)
    checkpoints: tuple[str, ...] = ()  # real checkpoint directories (bench.checkpoints): then `shapes` is not used
    quantize: str | None = None  # "int8": each engine model also measured with weight-only int8 decoder layers
    mixed: int = 0  # > 0: also in-flight vs static batching on this many shapes-v1 images (bench.inflight)
    mixed_model: str | None = None  # its LaVi checkpoint (None: the bundled tiny-shapes)
    out: str = "bench-model.json"
    markdown: str | None = "BENCHMARKS.md"

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(self.settings))
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "compress", tuple(VisualCompress.parse(v).spelled() for v in self.compress))
        if self.checkpoints:
            if set(self.settings) - set(CHECKPOINT_SETTINGS):
                raise ValueError(f"--settings with --model must be among {CHECKPOINT_SETTINGS}, got {self.settings}")
            missing = [p for p in self.checkpoints if not (Path(p) / "config.json").exists()]
            if missing:
                raise ValueError(f"--model {missing[0]}: no config.json there (a local checkpoint directory)")
        elif self.shapes not in SHAPES:
            raise ValueError(f"--shapes must be one of {SHAPES}, got {self.shapes!r}")
        else:
            known = {s.name for s in settings(self.shapes)}
            if set(self.settings) - known:
                raise ValueError(f"--settings for {self.shapes} must be among {sorted(known)}, got {self.settings}")
        if set(self.models) - set(MODELS):
            raise ValueError(f"--models must be among {MODELS}, got {self.models}")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"--batch-sizes must be positive, got {self.batch_sizes}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise ValueError("--prompt-tokens >= 1, --new-tokens >= 2 and --repeats >= 1 are required")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.compile_backend not in ("inductor", "cudagraphs", "eager"):
            raise ValueError(f"--compile-backend must be inductor, cudagraphs or eager, got {self.compile_backend!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch here")
        if self.device.startswith("cpu") and self.shapes in ("qwen2-7b-siglip", "qwen2.5-vl-7b"):
            raise ValueError(f"{self.shapes} is for --device cuda (a random 7B in fp32 on CPU is not a benchmark)")


def resolve(c: ModelBenchConfig) -> tuple[list[Setting], list[str], torch.dtype, bool]:
    cuda = c.device.startswith("cuda")
    chosen = [s for s in settings(c.shapes) if not c.settings or s.name in c.settings]
    if not c.settings and c.shapes == "tiny-shapes" and not cuda:
        chosen = [s for s in chosen if s.name in ("image", "video")]  # the CPU default stays a few minutes
    if not c.settings and c.shapes in QWEN_SHAPES and not cuda:
        chosen = [s for s in chosen if s.name == "image"]
    if c.shapes in QWEN_SHAPES:  # a LaVi of the Qwen's decoder beside the Qwen in our engine and in transformers
        models = list(c.models) or ["lavi", "qwen-vl", "hf-qwen-vl"]
    else:
        models = list(c.models) or ["lavi", "vlora", "concat"] + (["hf-llava-ov"] if cuda or c.shapes in (
            "tiny-random", "qwen2-0.5b-siglip") else [])
    dtype = getattr(torch, c.dtype) if c.dtype else torch.bfloat16 if cuda else torch.float32
    return chosen, models, dtype, cuda if c.compile is None else c.compile


def cpu_matmul_peak(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This CPU's matmul FLOP/s in `dtype` at torch's thread count, measured: the best of `repeats` n x n x n
    products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / best_s(lambda: a @ b, torch.device("cpu"), repeats)


def peak_flops(device: torch.device, given: float | None, dtype: torch.dtype = torch.float32) -> float | None:
    """The FLOP/s the utilisation columns divide by: given; a GPU's known dense bf16 peak; a CPU's measured matmul
    rate in the run's dtype (`cpu_matmul_peak`)."""
    if given:
        return given
    if device.type != "cuda":
        return cpu_matmul_peak(dtype=dtype)
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
