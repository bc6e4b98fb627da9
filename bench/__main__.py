"""`python -m bench model|pipeline ...`: the same flags as `lavi-label bench`, parsed with argparse only,
so the GPU machine (torch and transformers; no ray, decord, av, maybe no click) can run it from a checkout:

    PYTHONPATH=. python -m bench model --device cuda --shapes qwen2-7b-siglip --settings image
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks (see `lavi-label bench --help`).")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="LaVi vs the concat baseline (and transformers' LLaVA-OneVision).")
    m.add_argument("--device", default="cpu")
    m.add_argument("--shapes", default="tiny-shapes")
    m.add_argument("--settings", type=_names, default=())
    m.add_argument("--models", type=_names, default=())
    m.add_argument("--batch-sizes", type=_ints, default=())
    m.add_argument("--prompt-tokens", type=int, default=64)
    m.add_argument("--new-tokens", type=int, default=48)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--compile", dest="compile", action="store_true", default=None)
    m.add_argument("--no-compile", dest="compile", action="store_false")
    m.add_argument("--compile-backend", default="inductor", choices=("inductor", "cudagraphs", "eager"))
    m.add_argument("--max-batch", type=int, default=512)
    m.add_argument("--memory-fraction", type=float, default=0.85)
    m.add_argument("--peak-tflops", type=float, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    m.add_argument("--visual-compress", dest="compress", action="append", default=[])
    m.add_argument("--model", dest="checkpoints", action="append", default=[])
    m.add_argument("--quantize", choices=("int8",), default=None)
    m.add_argument("--mixed", type=int, default=0)
    m.add_argument("--mixed-model", default=None)
    m.add_argument("--out", default="bench-model.json")
    m.add_argument("--markdown", default="BENCHMARKS.md")
    q = sub.add_parser("pipeline", help="`lavi-label run` vs a plain model loop over the same decoded items.")
    q.add_argument("--images", type=int, default=200)
    q.add_argument("--videos", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--device", default="cpu")
    q.add_argument("--model", default=None)
    q.add_argument("--max-new-tokens", type=int, default=48)
    q.add_argument("--workdir", default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="bench-pipeline.json")
    q.add_argument("--markdown", default="BENCHMARKS.md")
    q.add_argument("--scale", type=lambda v: tuple(int(n) for n in v.split(",")), default=())
    q.add_argument("--scale-batch", type=int, default=256)
    q.add_argument("--resume-left", type=int, default=1000)
    w = sub.add_parser("render", help="Write a recorded model run's section again from its JSON (after the report "
                       "changes: the figures stay the run's).")
    w.add_argument("json")
    w.add_argument("--markdown", default="BENCHMARKS.md")
    g = sub.add_parser("merge", help="Copy the run sections of one BENCHMARKS.md (e.g. the GPU machine's) "
                       "into another.")
    g.add_argument("src")
    g.add_argument("dst", nargs="?", default="BENCHMARKS.md")
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = args.pop("command")
    if command == "merge":
        from bench.report import merge_sections

        print(json.dumps({"merged": merge_sections(args["src"], args["dst"]), "into": args["dst"]}))
        return
    if command == "render":
        from bench.model_report import render

        print(json.dumps({"section": render(args["json"], args["markdown"]), "into": args["markdown"]}))
        return
    args["markdown"] = args["markdown"] or None
    try:
        if command == "model":
            from bench.model import ModelBenchConfig, run
            from bench.model_report import markdown

            peak = args.pop("peak_tflops")
            config = ModelBenchConfig(**args, peak_flops=peak * 1e12 if peak else None)
        else:
            from bench.pipeline import PipelineBenchConfig, markdown, run

            config = PipelineBenchConfig(**args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    doc = run(config)
    print(markdown(doc))
    print(json.dumps({"out": config.out}))


if __name__ == "__main__":
    main()
