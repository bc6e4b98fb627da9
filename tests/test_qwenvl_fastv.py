"""FastV (`--visual-compress fastv:KEEP@LAYER`, lavi.visual_tokens.fastv) on a Qwen-VL: the pruned layers keep each
token's own M-RoPE angles and Qwen3-VL's deepstack features at the kept tokens; dct is refused by name. Tiny random
checkpoints of each kind (tests/qwenvl_fixture.py: a 2-layer decoder, so LAYER 0 prunes layer 1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engines import widen
from qwenvl_fixture import KINDS, PROMPT, dirs, image  # noqa: F401  (dirs: the fixture)

from lavi.qwenvl.engine import QwenVLEngine
from lavi.serving.generate import Generator
from lavi.serving.steps import GenerationConfig, setup_caches
from lavi.visual_tokens.fastv import keep_mask

GEN = GenerationConfig(max_new_tokens=8)


def _engine(dirs, kind: str, spelling: str | None, max_batch: int = 8) -> QwenVLEngine:  # noqa: F811
    return widen(QwenVLEngine.load(str(dirs[(kind, False)]), max_batch=max_batch, visual_compress=spelling,
                                   pack=False), pack=False)


def _mixed() -> tuple[list[np.ndarray], list[tuple], list[tuple[int, str]]]:
    sizes = [(24, 40), (64, 16), (56, 48)]
    visuals = [image(s, seed=i)[None] for i, s in enumerate(sizes)]
    media: list[tuple] = [("image", s) for s in sizes]
    visuals.append(np.stack([image((16, 24), i) for i in range(4)]))
    media.append(("video", (16, 24), [0.0, 0.5, 1.0, 1.5]))
    return visuals, media, [(i, q) for i in range(len(visuals)) for q in (PROMPT, "what colour is the square?")]


def _texts(engine: QwenVLEngine, visuals, media, requests) -> list[str]:
    return [g.text for g in engine.generate(visuals, requests, GEN, media=media)]


def _padded(conds, extra: int):
    """Per-layer conditioning whose residual (deepstack, over the prompt) gets `extra` zero tokens after it: the
    generated tokens take no deepstack features."""
    if conds is None:
        return None

    def cond(i: int):
        c = conds(i)
        return c if c.residual is None else c._replace(residual=F.pad(c.residual, (0, 0, 0, extra)))
    return cond


def _reference(model, vis, prompt: list[int], vc, steps: int) -> tuple[list[int], torch.Tensor]:
    """FastV by recomputation: the whole sequence through the uncached decoder at its M-RoPE positions (generated
    tokens on plain positions from the prompt's next one, equal on the three axes), deepstack added at the visual
    positions, layers past K attending to the prompt tokens the row keeps and every generated token."""
    dec, c = model.decoder, model.decoder.config
    ids = torch.tensor([prompt])
    valid = torch.ones_like(ids, dtype=torch.bool)
    embeds, kvalid, conds = model.inputs(vis, ids, valid)
    positions, nxt = model.prefill_positions(vis, ids, valid)
    t0 = embeds.shape[1]

    def causal(t: int) -> torch.Tensor:
        return torch.ones(1, 1, t, t, dtype=torch.bool).tril()

    seen = []  # layer K's attention inputs in the whole forward: q, k after its q/k norms and M-RoPE
    hook = dec.layers[vc.layer].self_attn.attend.register_forward_hook(lambda m, args, out: seen.append(args))
    try:
        dec(embeds, positions, causal(t0), conds=conds)
    finally:
        hook.remove()
    q, k = seen[0][0][:, :, -1:].float(), seen[0][1].float()  # (1, H, 1, D), (1, Hkv, T0, D)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = ((q @ k.transpose(-1, -2)) * c.head_dim ** -0.5).softmax(-1).mean(1)[:, 0]  # (1, T0)
    kept = keep_mask(probs, model.visual_positions(vis, ids, valid), kvalid, vc)
    out: list[int] = []
    for _ in range(steps):
        t = embeds.shape[1]
        after = (nxt[0] + torch.arange(t - t0)).view(1, 1, -1).expand(3, 1, -1)
        pos = torch.cat([positions, after], dim=2)
        padded = _padded(conds, t - t0)
        deep = causal(t) & torch.cat([kept[0], torch.ones(t - t0, dtype=torch.bool)])[None, None, None, :]
        logits, _ = dec(embeds, pos, causal(t), conds=padded, pruned=(vc.layer, deep))
        out.append(int(logits[0, -1].argmax()))
        embeds = torch.cat([embeds, dec.embed_tokens(torch.tensor([[out[-1]]]))], dim=1)
    return out, kept


@pytest.mark.parametrize("kind", KINDS)
def test_fastv_cached_generation_equals_recomputation_with_the_tokens_pruned(dirs, kind):  # noqa: F811
    """Guards against FastV on M-RoPE: the kept tokens' angles taken from the wrong positions (or recomputed as
    plain RoPE), Qwen3-VL's deepstack residual added at the wrong tokens past K, the q/k norms skipped in the
    ranking, the decode steps' deep layers still seeing the dropped tokens. The pruning must change the output."""
    engine = _engine(dirs, kind, "fastv:0.25@0")
    model, vc = engine.model, engine.model.visual_compress
    frames = image((56, 48), seed=5)[None]
    vis = engine._encode([frames], [("image", (56, 48))])
    prompt = engine._prompt(PROMPT, "image")
    cache = setup_caches(model, 4, 256)
    with torch.no_grad():
        for buffers in cache.layers:  # what earlier batches left: a slot read but never written would show
            buffers.k.normal_(std=30.0)
            buffers.v.normal_(std=30.0)
        got = Generator(model, cache)(vis, torch.tensor([0]), [prompt], GEN, eos_id=10_000)[0].tokens
        want, kept = _reference(model, vis, prompt, vc, GEN.max_new_tokens)
    assert got == want
    n_vis = int(vis.mask.sum())
    visual = model.visual_positions(vis, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool))
    assert int((kept & visual).sum()) == vc.kept(n_vis) < n_vis
    whole = QwenVLEngine.load(str(dirs[(kind, False)]), pack=False)
    whole.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        unpruned = Generator(whole.model, setup_caches(whole.model, 4, 256))(vis, torch.tensor([0]), [prompt], GEN,
                                                                             eos_id=10_000)[0].tokens
    assert unpruned != got  # the pruning matters here, or this test could not fail


@pytest.mark.parametrize("kind", KINDS)
def test_fastv_rows_in_a_batch_and_in_flight_are_their_own(dirs, kind):  # noqa: F811
    """Rows of different sizes (and a video) keep their own tokens: batched, in flight with a pool of 2 and one by
    one agree, and keeping everything is the unmodified model."""
    visuals, media, requests = _mixed()
    engine = _engine(dirs, kind, "fastv:0.3@0")
    engine.inflight = False
    static = _texts(engine, visuals, media, requests)
    alone = [_texts(engine, [visuals[i]], [media[i]], [(0, q)])[0] for i, q in requests]
    engine.inflight, engine.max_batch = True, 2
    assert _texts(engine, visuals, media, requests) == static == alone
    assert len(set(static)) > 2
    plain, everything = _engine(dirs, kind, None), _engine(dirs, kind, "fastv:1@0")
    assert _texts(everything, visuals, media, requests) == _texts(plain, visuals, media, requests)


def test_dct_is_refused_for_a_qwen_vl_by_name(dirs):  # noqa: F811
    """dct low-passes a square grid; a Qwen's grids are each item's own: refused at load and by the driver's check
    (lavi.visual_tokens.methods.checked, from the torch-free ModelInfo) with what it takes instead."""
    from pipeline.models import model_info
    from lavi.visual_tokens.methods import checked

    d = str(dirs[("qwen2_5_vl", False)])
    with pytest.raises(ValueError, match=r"takes fastv:KEEP\[@LAYER\] only"):
        QwenVLEngine.load(d, visual_compress="dct:0.25")
    info = model_info(d)
    assert info["compress_methods"] == ("fastv",)
    with pytest.raises(ValueError, match=r"takes fastv:KEEP\[@LAYER\] only"):
        checked("dct:0.5", info["name"], info["fusion"], info["compress_methods"], info["vision_in_context"])
    assert checked("fastv:0.5", info["name"], info["fusion"], info["compress_methods"],
                   info["vision_in_context"]).spelled() == "fastv:0.5@2"
