"""`lavi-label bench model`: LaVi vs the concat baseline in the same engine (and transformers' LLaVA-OV),
side by side in one run, at a 64-token prompt and exactly 48 new tokens (EOS never stops a row).

Per (model, visual setting, batch size): captions/s, time to first token, decode tokens/s, peak memory,
prefill FLOPs (counted on the real modules, shapes only, and the analytic formula beside it). Per
(model, setting) at batch 1: the decode-step roofline, weights + per-row state read per step over the
measured copy bandwidth, against the measured step time and its linear layers alone (`bench.roofline`).
Writes JSON and its BENCHMARKS.md section.
"""
from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import asdict
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from bench import flops as F
from bench.compiled import TimedGenerator
from bench.configs import QWEN_SHAPES, Setting, model_config, random_model, weight_bytes
from bench.memory import PeakMemory, copy_bandwidth, probe_batch, read_bandwidth, trim_heap
from bench.model_config import FUSION, ModelBenchConfig, peak_flops, resolve
from bench.model_report import markdown, ratios, section_key
from bench.report import command_line, device_description, versions, write_json, write_section
from bench.shape_rows import shape_rows
from bench import roofline as R
from lavi.visual_tokens.methods import VisualCompress
from lavi.core.fusion import Visual
from lavi.core.model import LaVi

log = logging.getLogger(__name__)
NEVER = -1  # an EOS id argmax never returns: every row generates exactly new_tokens
Inputs = tuple[Callable[[], Visual], Tensor, list[list[int]]]  # (encode, rows, prompts) of one batch


class Runner:
    """Holds the device-wide state of one run: the peak-memory meter, the bandwidth, the config."""

    def __init__(self, c: ModelBenchConfig) -> None:
        self.c = c
        self.device = torch.device(c.device)
        self.settings, self.models, self.dtype, self.compile = resolve(c)
        self.mem = PeakMemory(self.device)
        self.bandwidth = copy_bandwidth(self.device)
        self.read = read_bandwidth(self.device)
        self.peak = peak_flops(self.device, c.peak_flops, self.dtype)
        self.gen = torch.Generator().manual_seed(c.seed)

    def _inputs(self, model, setting: Setting, batch: int) -> Inputs:
        size = model.config.vision.image_size
        pixels = torch.randn(batch, setting.frames, 3, size, size, generator=self.gen).to(self.device, self.dtype)
        ids = torch.randint(4, model.config.decoder.vocab_size, (batch, self.c.prompt_tokens), generator=self.gen)
        return (lambda: model.encode(pixels, None)), torch.arange(batch), ids.tolist()

    def _generator(self, model, batch: int, max_seq: int, compile: bool) -> TimedGenerator:
        return TimedGenerator(model, batch, max_seq, compile=compile, backend=self.c.compile_backend)

    @staticmethod
    def _cold(model) -> bool:
        """True the first time a model is asked (then it is marked warm)."""
        cold = not getattr(model, "_bench_warm", False)
        model._bench_warm = True
        return cold

    def _release(self) -> None:
        """Hand freed memory back (a static cache goes with its generator) before the next allocation."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            trim_heap()

    def probe(self, try_batch) -> list[dict]:
        """CUDA, batch sizes not given: the probe's tries (`probe_batch`); otherwise none."""
        if self.device.type != "cuda" or self.c.batch_sizes:
            return []
        return probe_batch(self.device, try_batch, self._release, self.c.max_batch, self.c.memory_fraction)

    def _try_engine(self, model, inputs: Callable[[int], Inputs], max_seq: int):
        def run_once(b: int) -> None:
            self._generator(model, b, max_seq, compile=False).generate_from(*inputs(b), 2, NEVER)
        return run_once

    def _sizes(self, probe: list[dict], default: list[int]) -> list[int]:
        if self.c.batch_sizes:
            return list(self.c.batch_sizes)
        if not probe:
            return default
        best = max([p["batch_size"] for p in probe if p["fits"]], default=0)
        return sorted({1, best} - {0})

    def measure(self, model, inputs: Callable[[int], Inputs], batch: int, max_seq: int) -> dict:
        """One point: `inputs(batch)` -> (encode, rows, prompts), generated `repeats` times, the median kept."""
        gen = self._generator(model, batch, max_seq, compile=self.compile)
        encode, rows, prompts = inputs(batch)
        if self.compile:  # compile + CUDA-graph recording happen here, on the whole length, at each batch size
            for _ in range(2):
                gen.generate_from(encode, rows, prompts, self.c.new_tokens, NEVER)
        elif self._cold(model):  # eager: one short run per model warms the allocator, the thread pool and every
            gen.generate_from(encode, rows, prompts, 2, NEVER)  # op's first call (a full prefill: minutes at b4)
        self.mem.reset()
        runs = [gen.generate_from(encode, rows, prompts, self.c.new_tokens, NEVER)[1]
                for _ in range(self.c.repeats)]
        peak = self.mem.peak()
        total = statistics.median(r.total_s for r in runs)
        ttft = statistics.median(r.ttft_s for r in runs)
        decode = statistics.median(r.total_s - r.ttft_s for r in runs)
        del gen
        self._release()
        return {"batch_size": batch, "captions_per_s": batch / total, "ttft_s": ttft,
                "decode_tokens_per_s": batch * (self.c.new_tokens - 1) / decode, "peak_mem_bytes": peak,
                "encode_s": statistics.median(r.encode_s for r in runs), "total_s": total,
                "decode_step_s": decode / (self.c.new_tokens - 1)}

    def bench_engine(self, kind: str, setting: Setting) -> tuple[list[dict], list[dict]]:
        """One engine model at one setting: its rows at each batch size (and int8's), then, for concat, the same
        weights with each visual compression of the run; and the decode-step roofline of each at batch 1."""
        c = self.c
        config = model_config(c.shapes, FUSION[kind], setting)
        self.mem.rebase()
        model = random_model(config, self.device, self.dtype, seed=c.seed)
        inputs = partial(self._inputs, model, setting)
        plain = c.prompt_tokens + F.visual_context(config, setting.frames) + c.new_tokens
        probe = self.probe(self._try_engine(model, inputs, plain))
        sizes = self._sizes(probe, [1, 4] if c.shapes in ("qwen2-0.5b-siglip", *QWEN_SHAPES) else [1, 8, 32])
        variants = [(kind, None)] + [(f"{kind}-{v}", VisualCompress.parse(v)) for v in c.compress
                                     if kind == "concat"]
        commons = {}  # counted before packing: FastV's count runs on the model, and a packed layer is opaque to it
        for name, vc in variants:
            model.visual_compress = vc
            commons[name] = self._flops(model, config, setting, name, vc)
        weights = weight_bytes(model)["decode"]
        model = self._packed(model)
        self._release()  # the float weights packing replaced go back to the OS before any peak is taken
        rows, roofs, vis = [], [], None
        for name, vc in variants:
            model.visual_compress = vc
            common = dict(commons[name])
            max_seq = common.pop("max_seq")
            rows += self._variant_rows(model, inputs, name, setting, common, max_seq, sizes, probe)
            one = next((r for r in rows if r["model"] == name and r["batch_size"] == 1 and "error" not in r), None)
            if one is not None:
                if self.compile:  # the step alone would be the eager one, not the compiled one the run timed
                    alone, linears = None, R.linears_step_s(model)
                else:
                    if vis is None:  # one row's visual state, for each variant's step alone
                        encode, one_row, _ = inputs(1)
                        with torch.inference_mode():
                            vis = encode().select(one_row.to(self.device))
                    alone, linears = R.step_alone(model, vis, max_seq, c.new_tokens)
                state = R.state_bytes(config, setting, max_seq, kind, self.dtype)
                roofs.append(R.entry(name, setting, weights, state, one["decode_step_s"], linears,
                                     R.linears_bytes(model), alone))
        model.visual_compress = None
        del model, vis
        if c.quantize:  # the same weights as weight-only int8, the same points, beside the float rows
            del inputs  # it holds the float model too: both must be gone before the int8 baseline is taken
            rows += self._int8_rows(kind, config, setting, sizes)
        self._release()
        return rows, roofs

    def _variant_rows(self, model, inputs, name: str, setting: Setting, common: dict, max_seq: int,
                      sizes: list[int], probe: list[dict]) -> list[dict]:
        """One variant's rows at each batch size; a batch the GPU cannot hold is a row with its error."""
        rows = []
        for b in sizes:
            log.info("bench %s %s batch %d", name, setting.name, b)
            try:
                r = {**common, **self.measure(model, inputs, b, max_seq)}
            except torch.cuda.OutOfMemoryError as err:
                self._release()
                rows.append({**common, "batch_size": b, "error": f"OutOfMemoryError: {str(err)[:200]}"})
                continue
            r.update(self._utilization(r, common["prefill_flops"], common["caption_flops"]))
            if probe:
                r["probe"] = probe
            rows.append(r)
        return rows

    def _int8_rows(self, kind: str, config, setting: Setting, sizes: list[int]) -> list[dict]:
        """The same weights as weight-only int8, a row per batch size (the caller has dropped the float model)."""
        from lavi.serving.quant import quantize

        c = self.c
        self._release()  # the float model's memory goes back before the baseline is taken
        self.mem.rebase()  # as for the float rows: the peak counts the model's own (int8) weights
        model = random_model(config, self.device, self.dtype, seed=c.seed)  # int8 replaces plain layers only
        inputs = partial(self._inputs, model, setting)
        quantize(model, c.quantize)
        model = self._packed(model)  # what int8 leaves in float (ViLN's heads, the ViT), as loading does
        self._release()
        common = self._flops(model, config, setting, f"{kind}-{c.quantize}", None)
        max_seq, rows = common.pop("max_seq"), []
        for b in sizes:
            log.info("bench %s-%s %s batch %d", kind, c.quantize, setting.name, b)
            r = {**common, **self.measure(model, inputs, b, max_seq)}
            rows.append({**r, **self._utilization(r, common["prefill_flops"], common["caption_flops"])})
        return rows

    def _utilization(self, row: dict, prefill: int, caption: int) -> dict:
        """A measured row's achieved FLOP/s over the measured matmul peak: whole captions, and the prefill (TTFT)."""
        if not self.peak:
            return {"flop_utilization": None, "prefill_flop_utilization": None}
        return {"flop_utilization": row["captions_per_s"] * caption / self.peak,
                "prefill_flop_utilization": prefill * row["batch_size"] / row["ttft_s"] / self.peak}

    def _flops(self, model, config, setting: Setting, name: str, vc: VisualCompress | None) -> dict:
        """A row's common columns: the context, the static cache's slots, and the prefill FLOPs counted on the real
        modules (a meta-device copy, shapes only; FastV's pruning reads values, so it runs on `model`) and by the
        formula, and a whole caption's."""
        c = self.c
        nv = setting.visual_tokens(config.vision.patch_size)
        max_seq = c.prompt_tokens + F.visual_context(config, setting.frames, vc) + c.new_tokens
        if vc is not None and vc.prunes:
            counted = F.counted_prefill_flops(model, setting.frames, c.prompt_tokens, key_slots=max_seq,
                                              logits="last")
        else:
            with torch.device("meta"):
                shadow = LaVi(config)  # shapes only: counts the FLOPs of any size on any machine
            shadow.visual_compress = vc
            counted = F.counted_prefill_flops(shadow, setting.frames, c.prompt_tokens, key_slots=max_seq,
                                              logits="last")
            del shadow
        analytic = F.prefill_flops(config, setting.frames, c.prompt_tokens, key_slots=max_seq, logits="last",
                                   compress=vc)
        return {"model": name, "shapes": c.shapes, "setting": setting.name, "frames": setting.frames,
                "image_size": setting.image_size, "visual_tokens": nv,
                "context_visual_tokens": F.visual_context(config, setting.frames, vc), "prompt_tokens": c.prompt_tokens,
                "new_tokens": c.new_tokens, "dtype": str(self.dtype).removeprefix("torch."),
                "compiled": self.compile and c.compile_backend, "generator": "lavi.serving.generate.Generator",
                "prefill_flops": counted.total, "prefill_flops_analytic": analytic.total,
                "prefill_flops_breakdown": counted.to_dict(), "max_seq": max_seq,
                "caption_flops": F.caption_flops(config, setting.frames, c.prompt_tokens, c.new_tokens,
                                                 key_slots=max_seq, compress=vc)}

    def _packed(self, model):
        """As `Engine.load` does (`lavi.serving.load_prep`): on CPU in float32, eager, the linear layers oneDNN-packed."""
        from lavi.serving.load_prep import packed

        return packed(model, None, self.compile)


def run(c: ModelBenchConfig) -> dict:
    """Run the benchmark, write c.out (JSON) and c.markdown's section; returns the JSON document."""
    started = time.monotonic()
    r = Runner(c)
    results, roofline, skipped = [], [], []
    for path in c.checkpoints:
        from bench.checkpoints import bench_checkpoint
        rows, skips = bench_checkpoint(r, path)
        results.extend(rows)
        skipped.extend(skips)
    if not c.checkpoints:
        shape_rows(r, results, roofline, skipped)
    if c.mixed:
        from bench.inflight import measure_inflight
        from lavi.bundled import DEFAULT_MODEL

        inflight = measure_inflight(c.mixed_model or DEFAULT_MODEL, device=c.device, n_images=c.mixed,
                                    batch=max(c.batch_sizes or (32,)), max_new_tokens=c.new_tokens,
                                    repeats=c.repeats, seed=c.seed)
    # the bandwidth again at the end: a shared machine's varies over a run, and the roofline takes the better one
    bandwidths = [r.bandwidth, copy_bandwidth(r.device)]
    if r.device.type != "cuda" and not c.peak_flops:  # the CPU's matmul rate too: the better of start and end
        peaks = [r.peak, peak_flops(r.device, None, r.dtype)]
        r.peak = max(peaks)
        for row in results:
            if "error" not in row and row.get("caption_flops"):
                row.update(r._utilization(row, row["prefill_flops"], row["caption_flops"]))
    reads = [r.read, read_bandwidth(r.device)]
    R.finish(roofline, max(bandwidths))
    from bench.qwen_report import engine_ratios

    doc = {"results": results, "ratios": ratios(results, roofline, r.peak, max(bandwidths)), "roofline": roofline,
           "engine_ratios": engine_ratios(results),
           "skipped": skipped, "device": device_description(c.device), "versions": versions(),
           "command": command_line(), "config": asdict(c), "peak_mem_method": r.mem.method,
           "copy_bandwidth_bytes_per_s": max(bandwidths), "copy_bandwidths_start_end": bandwidths,
           "read_bandwidth_bytes_per_s": max(reads), "read_bandwidths_start_end": reads,
           "peak_flops": r.peak, "wall_s": time.monotonic() - started}
    if r.device.type != "cuda" and not c.peak_flops:
        doc["peak_flops_start_end"] = peaks
    if c.mixed:
        doc["inflight"] = inflight
    doc["section"] = section_key(asdict(c), c.settings if c.checkpoints else [s.name for s in r.settings])
    write_json(doc, c.out)
    if c.markdown:
        write_section(c.markdown, doc["section"], markdown(doc))
    return doc
