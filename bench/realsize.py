"""`lavi-label bench realsize`: a real-size LLaVA-OneVision through `lavi-label run` vs transformers' `generate()`.

The checkpoint has the 0.5B hub checkpoint's shapes (Qwen2-0.5B + SigLIP-so400m-384, anyres_max_9, 36 pinpoints of
384 px tiles up to 2304 x 2304) with random weights and a small byte-level BPE vocabulary, saved by transformers'
`save_pretrained` in bf16, in four safetensors shards, as a user downloads one. Four photo-sized JPEGs (640x480,
480x640, 1024x768, 384x384: 1.5k to 4.7k tokens in context each).

    transformers  LlavaOnevisionForConditionalGeneration.from_pretrained + its processor, generate() with
                  `new_tokens` greedy tokens for each image in turn, in this process (torch's default threads)
    run           `lavi-label run IMAGES --model DIR --max-new-tokens N` end to end, in a process of its own
                  (bench.child: Ray start, listing, decode, the labeler actor's load, commits, summary)

Where a CPU labeler computes in another dtype than the checkpoint's (float32 on a CPU without native bf16:
lavi.serving.cpu_pack.cpu_dtype), transformers runs a second time in that dtype, so that the two compare the same
arithmetic; the ratio is read against that run (the one as published is reported beside it).

Target (CPU): run within 1.25x of transformers' time (its load and generations) on the same machine.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.child import mb, run_child
from bench.report import (command_line, device_description, section_head, table, versions, write_json,
                          write_section)

SIZES = ((640, 480), (480, 640), (1024, 768), (384, 384))  # (width, height) of the four images
TILE = 384


@dataclass(frozen=True)
class RealsizeConfig:
    new_tokens: int = 12
    workdir: str | None = None  # checkpoint, images and labels (None: a temp dir, removed)
    seed: int = 0
    out: str = "bench-realsize.json"
    markdown: str | None = "BENCHMARKS.md"


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """The random real-size LLaVA-OneVision (see the module doc), written as transformers writes one."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from bench.hf_checkpoint import write_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(directory)
    vocab = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    pinpoints = [[TILE * i, TILE * j] for i in range(1, 7) for j in range(1, 7)]
    text = dict(model_type="qwen2", vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768,
                tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                bos_token_id=None)
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                  image_size=TILE, num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                                  video_token_index=ids["<video>"], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
                                  vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=f"{int(size * 1.1) // 4 // 2**20}MB")  # four shards
    LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints,
                                    do_convert_rgb=True).save_pretrained(directory)
    return directory


def write_images(directory: Path, seed: int = 0) -> list[Path]:
    """The four photo-sized JPEGs: smooth random colour fields (a photo's size and compressibility)."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        paths.append(directory / f"photo-{i}-{w}x{h}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def transformers_generate(model_dir: Path, images: list[Path], new_tokens: int, dtype: str | None = None) -> dict:
    """transformers' own path: from_pretrained (`dtype`, None: the checkpoint's, as a user gets it), its image
    processor (the PIL one), the chat template, the <image> token expanded to the processor's own feature count,
    generate() for each image in turn. (LlavaOnevisionProcessor itself cannot be built here: its video processor
    needs torchvision.) Returns load and generate seconds, the dtype and threads it ran with, the context lengths."""
    from types import SimpleNamespace

    import torch
    from PIL import Image
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    start = time.perf_counter()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        model_dir, **({"dtype": getattr(torch, dtype)} if dtype else {})).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pixels = LlavaOnevisionImageProcessorPil.from_pretrained(model_dir)
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    count = SimpleNamespace(image_processor=pixels, num_image_tokens=side * side,
                            vision_aspect_ratio=config.vision_aspect_ratio)
    count._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(count, *a)
    loaded = time.perf_counter()
    contexts = []
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        for path in images:
            image = Image.open(path).convert("RGB")
            inputs = pixels(images=image, return_tensors="pt")
            n = LlavaOnevisionProcessor._get_number_of_features(count, image.height, image.width, TILE, TILE)
            ids = tokenizer(prompt.replace("<image>", "<image>" * n), return_tensors="pt")["input_ids"]
            contexts.append(ids.shape[1])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=inputs["pixel_values"].to(model.dtype), image_sizes=inputs["image_sizes"],
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {"load_s": loaded - start, "generate_s": time.perf_counter() - loaded, "dtype": str(model.dtype),
            "threads": torch.get_num_threads(), "context_tokens": contexts}


def _cpu_dtype() -> str | None:
    """What a CPU labeler on this machine computes in (workers.labeler: lavi.serving.cpu_pack.cpu_dtype), as torch
    names it ("float32"); None: the checkpoint's own."""
    from lavi.serving.cpu_pack import cpu_dtype

    dtype = cpu_dtype()
    return None if dtype is None else str(dtype).removeprefix("torch.")


def run(c: RealsizeConfig) -> dict:
    tmp = None if c.workdir else tempfile.mkdtemp(prefix="lavi-realsize-")
    work = Path(c.workdir or tmp)
    try:
        work.mkdir(parents=True, exist_ok=True)
        model_dir = work / "llava-onevision-0.5b-shapes"
        if not (model_dir / "config.json").exists():
            make_checkpoint(model_dir, c.seed)
        images = write_images(work / "photos", c.seed)
        refs = [transformers_generate(model_dir, images, c.new_tokens)]
        if _cpu_dtype() is not None and refs[0]["dtype"] != f"torch.{_cpu_dtype()}":  # the run's arithmetic too
            refs.append(transformers_generate(model_dir, images, c.new_tokens, _cpu_dtype()))
        config = {"inputs": [str(work / "photos")], "out": str(work / "labels"), "model": str(model_dir),
                  "max_new_tokens": c.new_tokens, "overwrite": True}
        child = run_child(config, work / "labels", work)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = child["summary"]
    rows = [{"path": "transformers generate()", "wall_s": ref["load_s"] + ref["generate_s"], "load_s": ref["load_s"],
             "generate_s": ref["generate_s"], "rows": len(SIZES), "note": f"{ref['dtype']}, {ref['threads']} threads"
             + (", as published" if i == 0 else ", the run's dtype")} for i, ref in enumerate(refs)]
    rows.append({"path": "lavi-label run", "wall_s": child["process_wall_s"], "rows": summary["this_run"]["rows"],
                 "first_commit_s": child["first_commit_s"], "driver_peak_rss_mb": mb(child["peak_rss_bytes"]),
                 "note": ", ".join([f"{k} {v}" for k, v in summary["status"].items()]
                                   + [f"computes in {_cpu_dtype() or 'the checkpoint dtype'}"])})
    ratio = child["process_wall_s"] / rows[len(refs) - 1]["wall_s"]  # against the same arithmetic
    work = summary["this_run"].get("engine_work") or {}
    doc = {"results": rows, "ratio": ratio, "met": ratio <= 1.25, "context_tokens": refs[0]["context_tokens"],
           "ratio_as_published": child["process_wall_s"] / rows[0]["wall_s"],
           "engine_work": work, "ray_start_s": summary["this_run"].get("ray_start_s"),
           "labeler_ready_s": summary["this_run"].get("labeler_ready_s"),
           "device": device_description("cpu"), "versions": versions(), "command": command_line(),
           "config": asdict(c)}
    write_json(doc, c.out)
    if c.markdown:
        write_section(c.markdown, "pipeline-realsize-cpu", markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    c = doc["config"]
    return "\n".join([
        *section_head(f"bench realsize: a LLaVA-OneVision of the 0.5B hub shapes through `lavi-label run` on "
                      f"{doc['device']}", doc),
        f"Random weights in the 0.5B hub checkpoint's shapes (Qwen2-0.5B + SigLIP-so400m-384, anyres_max_9, 36 "
        f"pinpoints), bf16 safetensors in four shards from `save_pretrained`; four photo-sized JPEGs "
        f"({', '.join(f'{w}x{h}' for w, h in SIZES)}; {', '.join(map(str, doc['context_tokens']))} tokens in "
        f"transformers' context), {c['new_tokens']} new tokens each. transformers = from_pretrained + generate() for "
        "each image in this process; run = `lavi-label run` end to end in a process of its own.", "",
        table(doc["results"], [("path", "path"), ("wall_s", "wall s"), ("load_s", "load s"),
                               ("generate_s", "generate s"), ("rows", "rows"), ("first_commit_s", "first commit s"),
                               ("driver_peak_rss_mb", "driver peak RSS MB"), ("note", "")]), "",
        f"run / transformers wall time: {doc['ratio']:.3f} (target <= 1.25: {'met' if doc['met'] else 'missed'})"
        + _published(doc),
        *_work(doc),
    ]) + "\n"


def _work(doc: dict) -> list[str]:
    """What the run computed beside what transformers did: its prefills' tokens (rows x context, padding included)
    against the sum of transformers' contexts (one image at a time, no padding), and Ray's start."""
    work = doc.get("engine_work") or {}
    if not work:
        return []
    real = sum(doc["context_tokens"])
    return ["", f"The run's labeler prefilled {work.get('prefill_tokens', 0):,} tokens in {work.get('prefills', 0)} "
            f"prefills ({work.get('prefill_tokens', 0) / real:.2f}x transformers' {real:,}: rows of one prefill are "
            f"padded to its longest), then {work.get('decode_steps', 0)} decode steps; Ray started in "
            f"{doc.get('ray_start_s') or 0:.1f} s{_ready(doc)}."]


def _published(doc: dict) -> str:
    """Where transformers ran twice: which run the ratio is read against, and the ratio to the one as published."""
    if len(doc["results"]) < 3:
        return ""
    return (f"; read against transformers in the dtype the run computes in ({doc['results'][1]['note'].split(',')[0]}"
            f"); against transformers as published ({doc['results'][0]['note'].split(',')[0]}) "
            f"{doc['ratio_as_published']:.3f}")


def _ready(doc: dict) -> str:
    ready = doc.get("labeler_ready_s")
    return "" if ready is None else f", and its labeler had its model {ready:.1f} s after Ray's start began"
