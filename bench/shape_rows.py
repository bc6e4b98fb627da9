"""bench model's rows at its shapes (no --model): each model of the run at each visual setting."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.model import Runner


def shape_rows(r: "Runner", results: list[dict], roofline: list[dict], skipped: list[dict]) -> None:
    """Every model's rows at every setting of the benchmark's shapes, into `results`, `roofline` and `skipped`."""
    from bench.qwen import MODELS as QWEN_MODELS

    for setting in r.settings:
        for kind in r.models:
            if kind == "hf-llava-ov":
                from bench.hf_rows import bench_shapes
                rows, reason = bench_shapes(r, setting)
                if reason:
                    skipped.append({"model": kind, "setting": setting.name, "reason": reason})
                results.extend(rows)
                continue
            if kind in QWEN_MODELS:  # both from one model of the shapes (bench.qwen), at its first
                if kind == next(k for k in r.models if k in QWEN_MODELS):
                    from bench.qwen import bench_shapes as qwen_shapes
                    rows, roofs, reason = qwen_shapes(r, setting)
                    if reason:
                        skipped.append({"model": kind, "setting": setting.name, "reason": reason})
                    results.extend(rows)
                    roofline.extend(roofs)
                continue
            rows, roofs = r.bench_engine(kind, setting)
            results.extend(rows)
            roofline.extend(roofs)
