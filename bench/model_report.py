"""The model bench's results read side by side: LaVi over the others, and the BENCHMARKS.md section."""
from __future__ import annotations

from pathlib import Path

from bench.report import table, write_section


def caption_time_bound(row: dict, roof: dict | None, peak: float | None, bandwidth: float | None) -> float | None:
    """The least time one caption of `row` (at its batch size) can take on this machine: its prefill at the matmul
    peak, then each decode step at the slower of its FLOPs at the peak and its bytes at the copy bandwidth (the
    weights once per step for the whole batch, the row's own state: cache, K/U or factors). None without a
    roofline entry (transformers' rows) or without the peak and bandwidth."""
    if roof is None or not peak or not bandwidth or not row.get("caption_flops"):
        return None
    steps = row["new_tokens"] - 1
    step_flops = (row["caption_flops"] - row["prefill_flops_analytic"]) / steps
    step_bytes = roof["weight_bytes_per_step"] / row["batch_size"] + roof["state_bytes_per_step"]
    return row["prefill_flops"] / peak + steps * max(step_flops / peak, step_bytes / bandwidth)


def ratios(results: list[dict], roofline: list[dict] = (), peak: float | None = None,
           bandwidth: float | None = None) -> list[dict]:
    """LaVi over the others (VLoRA, concat and its compressions, transformers), per setting: at equal batch size,
    with the FLOP bound and (engine rows) the roofline bound, and best captions/s against best."""
    roofs = {(r["model"], r["setting"]): r for r in roofline}

    def time_bound(row: dict) -> float | None:
        return caption_time_bound(row, roofs.get((row["model"], row["setting"])), peak, bandwidth)

    out = []
    ok = [r for r in results if "error" not in r]
    for setting in dict.fromkeys(r["setting"] for r in ok):
        lavi = {r["batch_size"]: r for r in ok if r["setting"] == setting and r["model"] == "lavi"}
        if not lavi:
            continue
        best_lavi = max(r["captions_per_s"] for r in lavi.values())
        for other in dict.fromkeys(r["model"] for r in ok if r["setting"] == setting and r["model"] != "lavi"):
            theirs = {r["batch_size"]: r for r in ok if r["setting"] == setting and r["model"] == other}
            if not theirs:
                continue
            for b in sorted(set(lavi) & set(theirs)):
                ratio = lavi[b]["captions_per_s"] / theirs[b]["captions_per_s"]
                # the FLOP bound: a caption's counted FLOPs (tower, fusion, prefill, decode), theirs over LaVi's
                bound = (theirs[b]["caption_flops"] / lavi[b]["caption_flops"]
                         if theirs[b].get("caption_flops") and lavi[b].get("caption_flops") else None)
                mine, their_time = time_bound(lavi[b]), time_bound(theirs[b])
                roof_bound = their_time / mine if mine and their_time else None
                out.append({"setting": setting, "versus": other, "batch_size": b, "captions_per_s_ratio": ratio,
                            "ttft_ratio": theirs[b]["ttft_s"] / lavi[b]["ttft_s"], "flop_bound_ratio": bound,
                            "of_bound": ratio / bound if bound else None, "roofline_bound_ratio": roof_bound,
                            "of_roofline_bound": ratio / roof_bound if roof_bound else None})
            out.append({"setting": setting, "versus": other, "batch_size": "best",
                        "captions_per_s_ratio": best_lavi / max(r["captions_per_s"] for r in theirs.values())})
    return out


def step_ratios(roofline: list[dict]) -> list[dict]:
    """Per setting, each model's batch-1 decode step over concat's: measured time, bytes read, and their quotient."""
    out = []
    for r in roofline:
        base = next((c for c in roofline if c["model"] == "concat" and c["setting"] == r["setting"]), None)
        if base is None or r["model"] == "concat":
            continue
        step = r["measured_step_s"] / base["measured_step_s"]
        nbytes = ((r["weight_bytes_per_step"] + r["state_bytes_per_step"])
                  / (base["weight_bytes_per_step"] + base["state_bytes_per_step"]))
        alone = (r["step_alone_s"] / base["step_alone_s"] if r.get("step_alone_s") and base.get("step_alone_s")
                 else None)
        out.append({"setting": r["setting"], "model": r["model"], "step_ratio": step, "bytes_ratio": nbytes,
                    "beyond_bytes": step / nbytes, "alone_ratio": alone,
                    "alone_beyond_bytes": alone / nbytes if alone else None})
    return out


def _goal(target: str, where: str, measured: float, threshold: float, at_least: bool, cause: str | None) -> dict:
    met = measured >= threshold if at_least else measured <= threshold
    return {"target": target, "where": where, "measured": measured, "met": "yes" if met else "no",
            "gap": None if met else abs(threshold - measured), "cause": None if met else cause}


def targets(doc: dict) -> list[dict]:
    """The real-shape targets (not tiny shapes, all per-op overhead there) checked against this run's figures:
    LaVi's speedup >= 0.9 of its FLOP bound, prefill >= 0.5 of the matmul peak, the batch-1 decode step within
    1.5x of its roofline, and LaVi's step no slower than concat's beyond the bytes it adds. A missed one's cause
    is what the run's other figures say of it."""
    from bench.qwen_report import targets as qwen_targets

    c = doc["config"]
    if not c.get("checkpoints") and str(c.get("shapes", "")).startswith("tiny"):
        return []
    out = qwen_targets(doc)
    for r in doc["ratios"]:
        if r["batch_size"] == "best" or r.get("of_bound") is None or r["versus"] not in ("concat", "hf-llava-ov"):
            continue
        if r.get("of_roofline_bound") is not None:
            cause = (f"decode at batch {r['batch_size']} is bound by reading weights, alike for both, not by FLOPs: "
                     f"the roofline bound is {r['roofline_bound_ratio']:.3g}x, and the measured ratio "
                     f"{r['of_roofline_bound']:.3g} of it")
        else:
            cause = (f"no roofline for transformers' rows (its cache grows); at batch {r['batch_size']} its decode, as "
                     "LaVi's, reads weights, which the FLOP bound does not count")
        out.append(_goal(f"LaVi/{r['versus']} captions/s >= 0.9 of the FLOP bound",
                         f"{r['setting']}, batch {r['batch_size']}", r["of_bound"], 0.9, True, cause))
    for r in doc["results"]:
        if r["model"] in ("lavi", "concat") and r.get("prefill_flop_utilization") is not None:
            out.append(_goal("prefill >= 0.5 of the matmul peak", f"{r['model']}, {r['setting']}, batch "
                             f"{r['batch_size']}", r["prefill_flop_utilization"], 0.5, True, None))
    rest = {}
    for roof in doc["roofline"]:
        if roof["model"] not in ("lavi", "concat"):
            continue
        cause = None
        if roof.get("linears_over_roofline") is not None:
            rest[(roof["model"], roof["setting"])] = roof["rest_step_s"]
            alone = roof.get("step_alone_over_roofline")
            cause = ((f"the step alone (best of 5, in turns with its linears) takes {alone:.3g}x the roofline; "
                      if alone is not None else "")
                     + f"the linear layers alone take {roof['linears_over_roofline']:.3g}x the roofline, their kernels "
                     f"reading weights at {roof['linears_read_bytes_per_s'] / 1e9:.3g} GB/s"
                     + (f" (a streaming read: {doc['read_bandwidth_bytes_per_s'] / 1e9:.3g} GB/s)"
                        if doc.get("read_bandwidth_bytes_per_s") else "")
                     + f"; the rest of the step {roof['rest_step_s'] * 1e3:.3g} ms")
        out.append(_goal("decode step at batch 1 <= 1.5x its roofline", f"{roof['model']}, {roof['setting']}",
                         roof["measured_over_roofline"], 1.5, False, cause))
    for s in step_ratios(doc["roofline"]):
        if s["model"] != "lavi":
            continue
        mine, theirs = rest.get(("lavi", s["setting"])), rest.get(("concat", s["setting"]))
        cause = None if mine is None or theirs is None else (
            f"outside the linear layers LaVi's step takes {mine * 1e3:.3g} ms, concat's {theirs * 1e3:.3g} ms: "
            "its conditioner's attention over K/U and the small ops around it")
        alone = s["alone_beyond_bytes"] is not None  # the steps alone: measured in the same moments as their linears
        out.append(_goal("LaVi's decode step / concat's <= their bytes' ratio" + (" (steps alone)" if alone else ""),
                         s["setting"], s["alone_beyond_bytes"] if alone else s["beyond_bytes"], 1.0, False, cause))
    return out


def section_key(config: dict, settings: list[str]) -> str:
    """The BENCHMARKS.md section of a run: what it measured (checkpoint names or shapes), where, which settings."""
    subject = "+".join(Path(p).name for p in config.get("checkpoints") or ()) or config["shapes"]
    dtype = f"-{config['dtype']}" if config.get("dtype") else ""  # a dtype chosen by --dtype: a section of its own
    return f"model-{subject}-{str(config['device']).split(':')[0]}-{'+'.join(settings) or 'all'}{dtype}"


def render(path: str, markdown_path: str) -> str:
    """Write a recorded run's (its JSON at `path`) section again, as this report writes it: the figures are the
    run's, the tables and targets today's. -> the section's key."""
    import json

    doc = json.loads(Path(path).read_text())
    key = doc.get("section") or section_key(  # runs recorded before the key was: the settings in their rows' order
        doc["config"], doc["config"].get("settings") if doc["config"].get("checkpoints")
        else list(dict.fromkeys(r["setting"] for r in doc["results"])))
    write_section(markdown_path, key, markdown(doc))
    return key


def markdown(doc: dict) -> str:
    """A recorded run's BENCHMARKS.md section: the setup, the rows, LaVi's ratios, the decode-step roofline, the
    targets, and what was skipped."""
    lines = _heading(doc)
    lines.append(table(doc["results"], [
        ("model", "model"), ("setting", "setting"), ("visual_tokens", "visual tokens"),
        ("context_visual_tokens", "in context"), ("batch_size", "batch"),
        ("captions_per_s", "captions/s"), ("ttft_s", "TTFT s"), ("decode_tokens_per_s", "decode tok/s"),
        ("peak_mem_bytes", "peak mem B"), ("prefill_flops", "prefill FLOPs/item"),
        ("flop_utilization", "FLOP util"), ("prefill_flop_utilization", "prefill FLOP util"), ("error", "error")]))
    if doc["ratios"]:
        lines += ["", "LaVi over the others:", "", table(doc["ratios"], [
            ("setting", "setting"), ("versus", "versus"), ("batch_size", "batch"),
            ("captions_per_s_ratio", "captions/s ratio"), ("ttft_ratio", "TTFT ratio"),
            ("flop_bound_ratio", "FLOP-bound ratio"), ("of_bound", "measured / bound"),
            ("roofline_bound_ratio", "roofline-bound ratio"), ("of_roofline_bound", "measured / roofline bound")])]
    from bench.qwen_report import engine_ratios

    engines = engine_ratios(doc["results"])
    if engines:
        lines += ["", "Our engine over transformers' generate() on the same weights, pixels and prompt:", "",
                  table(engines, [("subject", "model"), ("setting", "setting"), ("batch_size", "batch"),
                                  ("dtype", "dtype"), ("context_tokens", "context"),
                                  ("captions_per_s_ratio", "captions/s ratio"), ("ttft_ratio", "TTFT ratio"),
                                  ("decode_ratio", "decode tok/s ratio")])]
    if doc["roofline"]:
        lines += _roofline(doc)
    goals = targets(doc)
    if goals:
        lines += ["", "Targets (the engine's at real shapes), each with the figure it is read from, how far a missed one "
                  "is from it, and what the run's own figures say of the cause:", "",
                  table(goals, [("target", "target"), ("where", "where"), ("measured", "measured"),
                                ("met", "met"), ("gap", "gap"), ("cause", "cause")])]
    if doc.get("wall_s"):
        lines.append(f"\nThe whole run took {doc['wall_s'] / 60:.1f} min.")
    for s in doc["skipped"]:
        lines.append(f"\nskipped {s['model']} ({s['setting']}): {s['reason']}")
    if doc.get("inflight"):
        from bench.inflight import markdown as inflight_markdown
        lines.append(inflight_markdown(doc["inflight"]))
    return "\n".join(lines) + "\n"


def _heading(doc: dict) -> list[str]:
    """The section's title, command, versions and setup (prompt, tokens, weights, how memory and FLOPs are read)."""
    c = doc["config"]
    checkpoints = c.get("checkpoints") or ()
    subject = ", ".join(checkpoints) if checkpoints else c["shapes"]
    weights = "each checkpoint's own weights, random pixels" if checkpoints else "random weights"
    return [f"## bench model: {subject} on {doc['device']}", "",
            f"`{doc['command']}`", "",
            "versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
            f"Prompt {c['prompt_tokens']} tokens, exactly {c['new_tokens']} new tokens (EOS ignored), greedy, "
            f"{weights}. Peak memory: {doc['peak_mem_method']}."
            + (f" FLOP utilisation against {doc['peak_flops'] / 1e9:.0f} GFLOP/s" if doc.get("peak_flops") else "")
            + (f" (this CPU's {c.get('dtype') or 'float32'} matmul, measured in this run" + (
                ": the better of {:.0f} at its start and {:.0f} at its end".format(*(p / 1e9 for p in
                                                                                   doc["peak_flops_start_end"]))
                if doc.get("peak_flops_start_end") else "") + ")." if doc.get("peak_flops") and "cuda" not in
               c["device"] and not c.get("peak_flops") else ""), ""]


def _roofline(doc: dict) -> list[str]:
    """The decode step at batch 1 against the weights-read roofline, then each model's step over concat's."""
    measured = doc.get("copy_bandwidths_start_end")
    roofs = [{**r, "linears_read_gb_s": r["linears_read_bytes_per_s"] / 1e9} if r.get("linears_read_bytes_per_s")
             else r for r in doc["roofline"]]
    lines = ["", f"Decode step at batch 1 vs the weights-read roofline (copy bandwidth "
             f"{doc['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"
             + (f", the better of {measured[0] / 1e9:.1f} at the run's start and {measured[1] / 1e9:.1f} at its "
                "end" if measured else "")
             + (f"; a streaming read {doc['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, the better of the same two"
                if doc.get("read_bandwidth_bytes_per_s") else "") + "):", "", table(roofs, [
                 ("model", "model"), ("setting", "setting"), ("weight_bytes_per_step", "weight B"),
                 ("state_bytes_per_step", "state B"), ("roofline_step_s", "roofline s"),
                 ("measured_step_s", "measured s"), ("measured_over_roofline", "measured / roofline"),
                 ("step_alone_s", "alone s"), ("step_alone_over_roofline", "alone / roofline"),
                 ("linears_step_s", "linears s"), ("linears_over_roofline", "linears / roofline"),
                 ("linears_read_gb_s", "linears read GB/s"), ("rest_step_s", "rest s")])]
    steps = step_ratios(doc["roofline"])
    if steps:
        lines += ["", "Decode step at batch 1, each model over concat's: the time measured against the bytes read "
                  "(weights + state), so a ratio of time above the ratio of bytes is time lost beyond the bytes:",
                  "", table(steps, [("setting", "setting"), ("model", "model"), ("step_ratio", "step ratio"),
                                    ("bytes_ratio", "bytes ratio"), ("beyond_bytes", "step / bytes"),
                                    ("alone_ratio", "alone ratio"), ("alone_beyond_bytes", "alone / bytes")])]
    return lines
