"""In-flight batching: a pool of cache rows that finished rows hand to waiting requests gives every row the tokens
static batching (and the row alone) gives it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from engines import widen

from lavi.serving.engine import Engine
from lavi.serving.generate import Generator
from lavi.serving.steps import GenerationConfig, setup_caches
from lavi.tiny_models import make_tiny_checkpoint

PROMPTS = ["describe the image.", "a", "what colour is the big red circle on the left of the image?",
           "how many", "describe", "is there a small blue square in the top right corner of the picture?", "the"]


@pytest.fixture(scope="module", params=["viln", "concat", "vlora"])
def engine(request, tmp_path_factory) -> Engine:
    """A tiny random model whose generations differ by row: every weight matrix past the ViT widened (at the
    default init every row repeats one token, and a test of which row got whose tokens could not fail)."""
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp(f"tiny-{request.param}")), seed=1, fusion=request.param)
    return widen(Engine.load(path, max_batch=3, pack=False))


def _clips(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (f, size, size, 3), dtype=np.uint8) for f in ([1, 3, 2][:n])]


def _texts(engine: Engine, inflight: bool, max_batch: int, requests, gen) -> list[tuple[str, int, bool]]:
    engine.inflight, engine.max_batch = inflight, max_batch
    clips = _clips(3, engine.image_size)
    return [(c.text, c.num_generated_tokens, c.finished) for c in engine.generate(clips, requests, gen)]


def test_inflight_generations_equal_static_batching_and_each_row_alone(engine):
    """Guards against in-flight rows that see another row's cache slots, positions or visual state (a request
    admitted into a row another just left), and against requests lost or returned out of order."""
    requests = [(i % 3, p) for i, p in enumerate(PROMPTS)]
    gen = GenerationConfig(max_new_tokens=12)
    static = _texts(engine, False, 32, requests, gen)
    assert _texts(engine, True, 3, requests, gen) == static  # a pool of 3 rows for 7 requests
    assert _texts(engine, True, 32, requests, gen) == static
    alone = [_texts(engine, False, 1, [r], gen)[0] for r in requests]
    assert alone == static


def test_rows_that_stop_early_hand_their_cache_row_to_waiting_requests(engine):
    """Guards against a row's own max_new_tokens or EOS not ending it (or ending its neighbours), and against a
    waiting request never admitted when rows free up at different steps."""
    clips = _clips(3, engine.image_size)
    vis = engine._encode(clips, [("video", c.shape[1:3]) for c in clips])
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    rows = torch.tensor([i % 3 for i in range(len(PROMPTS))])
    gen = GenerationConfig(max_new_tokens=16)
    full = Generator(engine.model, setup_caches(engine.model, len(prompts), 128))(vis, rows, prompts, gen, -1)
    budgets = [16, 1, 9, 3, 16, 2, 7]
    # as EOS, a token the model does generate in some rows (within their budgets) and not in the others
    eos = next(t for t in dict.fromkeys(t for f in full for t in f.tokens)
               if 0 < sum(t in f.tokens[:n] for f, n in zip(full, budgets)) < len(full))
    pool = Generator(engine.model, setup_caches(engine.model, 2, 128))
    got = pool(vis, rows, prompts, gen, eos, max_new_tokens=budgets, turns=True)
    stopped = 0
    for g, f, n in zip(got, full, budgets):
        want = f.tokens[:n]
        end = want.index(eos) if eos in want else None
        assert g.tokens == (want if end is None else want[:end]) and g.finished == (end is not None)
        stopped += end is not None
    assert stopped >= 1 and any(not g.finished for g in got)


def test_the_inflight_decode_step_compiles_whole(engine):
    """Guards against a graph break in the per-row decode step (its per-row cache writes), which would stop CUDA
    graphs on the GPU: torch.compile(fullgraph=True) raises on any break; the tokens equal eager's."""
    clips = _clips(3, engine.image_size)
    vis = engine._encode(clips, [("video", c.shape[1:3]) for c in clips])
    prompts = [engine.encode_prompt(p) for p in PROMPTS[:4]]
    rows = torch.tensor([0, 1, 2, 0])
    gen = GenerationConfig(max_new_tokens=6)
    eager = Generator(engine.model, setup_caches(engine.model, 2, 128))(vis, rows, prompts, gen, -1, turns=True)
    compiled = Generator(engine.model, setup_caches(engine.model, 2, 128), compile=True, backend="eager")
    assert compiled(vis, rows, prompts, gen, -1, turns=True) == eager


def test_bench_measures_inflight_against_static_on_a_mixed_workload(tmp_path):
    """Guards against the in-flight benchmark timing something else than the two modes on the same rows (its texts
    must agree), or writing no figures."""
    from bench.inflight import markdown, measure_inflight
    from lavi.bundled import DEFAULT_MODEL

    m = measure_inflight(DEFAULT_MODEL, n_images=3, questions=2, batch=4, max_new_tokens=32, repeats=1)
    assert m["rows"] == 9 and m["same_texts"] and m["generated_tokens"]["max"] > m["generated_tokens"]["min"]
    assert m["inflight"]["rows_per_s"] > 0 and m["static"]["rows_per_s"] > 0
    assert "in-flight / static" in markdown(m)


def _block(engine, clips: list[np.ndarray], prompts: list[str], tag: str):
    """A labeler input block (CLIP_SCHEMA): every clip asked every prompt."""
    import pyarrow as pa

    from schemas.clips import CLIP_SCHEMA, ITEM_ROWS

    rows = [{"item_id": f"{tag}{i}", "uri": f"/{tag}{i}.mp4", "media_type": "video",
             "prompts": [{"task": "vqa", "prompt": p} for p in prompts], "clip_index": 0, "clip_start_s": 0.0,
             "clip_end_s": 1.0, "frame_timestamps_s": [0.0] * len(c), "width": c.shape[2], "height": c.shape[1],
             "frames": c.tobytes(), "frame_shape": list(c.shape), "status": "ok", "error_stage": None, "error": None,
             ITEM_ROWS: len(prompts)} for i, c in enumerate(clips)]
    return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)


def _texts_of(table) -> list[tuple[str, str, str]]:
    return [(r["item_id"], r["prompt"], r["text"]) for r in table.to_pylist()]


def test_the_streaming_labeler_keeps_the_pool_full_across_blocks(engine):
    """Guards against the pool draining at each block's end (rows idle while the next block waits) and against a
    block's rows coming out with another block's texts: two blocks submitted at once share the pool (a request of
    the second is admitted while a row of the first is in flight), and each block's rows equal what the plain
    labeler gives that block alone."""
    import asyncio

    from lavi.serving.inflight import InflightPool
    from workers.labeler import Labeler, StreamingLabeler

    engine.inflight, engine.max_batch = True, 4
    gen = {"max_new_tokens": 10}
    a = _block(engine, _clips(2, engine.image_size), PROMPTS[:3], "a")  # 6 requests: 4, then 2 beside b's
    b = _block(engine, _clips(3, engine.image_size)[1:], PROMPTS[3:], "b")
    want = [_texts_of(Labeler.from_engine(engine, "job", gen)(x)) for x in (a, b)]
    mixed, admit = [], InflightPool._admit

    def spy(pool, free, take):  # the blocks the pool serves once these are admitted
        mixed.append(len({id(o.ticket) for o in pool.owner if o is not None} | {id(r.ticket) for r in take}) > 1)
        admit(pool, free, take)

    InflightPool._admit = spy
    try:
        labeler = StreamingLabeler.from_engine(engine, "job", gen)

        async def both():
            return await asyncio.gather(labeler(a), labeler(b))

        got = [_texts_of(t) for t in asyncio.run(both())]
    finally:
        labeler.server.stop()
        InflightPool._admit = admit
    assert got == want and all(r[2] is not None for block in got for r in block)
    assert any(mixed), "no admission served two blocks: the pool drained between them"


def test_a_failed_inflight_step_retries_the_blocks_in_static_batches(engine):
    """Guards against a step failure (say, a CUDA error on one admission) losing or duplicating rows: every block
    in flight is retried in static batches, and its rows come out once, labelled as the plain labeler labels them."""
    import asyncio

    from lavi.serving.inflight import InflightPool
    from workers.labeler import Labeler, StreamingLabeler

    engine.inflight, engine.max_batch = True, 2
    gen = {"max_new_tokens": 6}
    block = _block(engine, _clips(2, engine.image_size), PROMPTS[:3], "a")
    want = _texts_of(Labeler.from_engine(engine, "job", gen)(block))
    admit, calls = InflightPool._admit, []

    def fail_once(pool, free, take):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        admit(pool, free, take)

    InflightPool._admit = fail_once
    labeler = StreamingLabeler.from_engine(engine, "job", gen)
    try:
        got = _texts_of(asyncio.run(labeler(block)))
    finally:
        labeler.server.stop()
        InflightPool._admit = admit
    assert len(calls) >= 2 and got == want


def test_prefill_groups_keep_rows_of_similar_length_together():
    """Rows are padded to their group's longest: a long row gets a group of its own rather than padding short ones to
    its length, and short contexts (a few hundred tokens of padding in all) stay one batch."""
    from lavi.serving.steps import PAD_TOKENS, prefill_groups

    assert prefill_groups([30, 20, 25, 31]) == [[1, 2, 0, 3]]  # short: one batch, shortest first
    groups = prefill_groups([1493, 4733, 2600, 1500, 4700])
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert [0, 3] in groups and [4, 1] in groups and [2] in groups
    lengths = [7, 900, 40, 3000, 3100, 12, 950]
    for g in prefill_groups(lengths):  # every group within its padding allowance
        real = sum(lengths[i] for i in g)
        assert len(g) * max(lengths[i] for i in g) - real <= max(0.25 * real, PAD_TOKENS)


def test_a_failed_admission_fails_its_tickets_instead_of_leaving_them_waiting(engine):
    """Guards against requests taken from the queue for an admission that then fails (its second prefill group, say)
    being in neither the queue nor the cache's rows: reset() would not fail their ticket and its caller would wait
    forever. The engine's failed step must leave the ticket done, with the error."""
    from lavi.serving.inflight import InflightPool
    from lavi.serving.steps import GenerationConfig

    engine.inflight, engine.max_batch = True, 3
    prefill, calls = InflightPool._prefill, []

    def fail_second(pool, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        prefill(pool, *args)

    clips = _clips(2, engine.image_size)
    InflightPool._prefill = fail_second
    try:  # prompts of a few and ~800 tokens: two prefill groups (lavi.serving.steps.prefill_groups)
        ticket = engine.submit(clips, [(0, "a"), (1, " ".join(["describe the image."] * 200))],
                               GenerationConfig(max_new_tokens=3))
        with pytest.raises(RuntimeError, match="boom"):
            engine.run(ticket)
    finally:
        InflightPool._prefill = prefill
    assert len(calls) == 2 and ticket.done.is_set() and isinstance(ticket.error, RuntimeError)
    assert not engine.in_flight and not engine._pool.waiting
