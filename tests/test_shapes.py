"""shapes-v1: renderer conformance to SHAPES.md, determinism, tokenizer, corpus files, scorer."""

from __future__ import annotations

import io
import json
import math

import av
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shapes import corpus, render, score, spec

N_IMAGES, N_VIDEOS = 150, 40


@pytest.fixture(scope="module")
def images() -> list[render.ImageItem]:
    rng = np.random.default_rng(123)
    return [render.sample_image(rng) for _ in range(N_IMAGES)]


@pytest.fixture(scope="module")
def videos() -> list[render.VideoItem]:
    rng = np.random.default_rng(456)
    return [render.sample_video(rng) for _ in range(N_VIDEOS)]


def _area(shape: str, s: float) -> float:
    return {"circle": math.pi * s * s / 4, "square": s * s, "triangle": s * s / 2}[shape]


def _cell(x: float, y: float) -> int:
    return min(int(y * 3 / 128), 2) * 3 + min(int(x * 3 / 128), 2)


def test_same_seed_same_items_other_seed_differs():
    """Guards against hidden global randomness (np.random / random) making corpora irreproducible."""
    a, b = render.sample_image(np.random.default_rng(7)), render.sample_image(np.random.default_rng(7))
    assert np.array_equal(a.pixels, b.pixels) and a.caption == b.caption and a.qa == b.qa
    c = render.sample_image(np.random.default_rng(8))
    assert not np.array_equal(a.pixels, c.pixels)
    va, vb = render.sample_video(np.random.default_rng(7)), render.sample_video(np.random.default_rng(7))
    assert np.array_equal(va.frames, vb.frames) and va.caption == vb.caption and va.qa == vb.qa
    assert not np.array_equal(va.frames, render.sample_video(np.random.default_rng(8)).frames)


def test_images_follow_the_spec(images):
    """Guards against objects off their cell, wrong colours/sizes, shared (colour, shape) or a bad background."""
    counts = set()
    for item in images:
        assert item.pixels.shape == (128, 128, 3) and item.pixels.dtype == np.uint8
        n = len(item.placed)
        counts.add(n)
        assert 1 <= n <= 3
        assert len({p.cell for p in item.placed}) == n
        assert len({(p.colour, p.shape) for p in item.placed}) == n
        assert all(200 <= v <= 255 for v in item.background) and 0 <= item.noise_sigma <= 6
        far = np.ones((128, 128), bool)
        yy, xx = np.mgrid[0:128, 0:128] + 0.5
        for p in item.placed:
            (cx, cy), = p.centres
            cell = p.cell
            assert abs(cx - (cell % 3 + 0.5) * 128 / 3) <= 3 and abs(cy - (cell // 3 + 0.5) * 128 / 3) <= 3
            lo, hi = spec.SIZES[p.size]
            assert lo <= p.s <= hi
            pixel = item.pixels[int(cy), int(cx)].astype(int)
            assert np.all(np.abs(pixel - spec.COLOURS[p.colour]) <= 20), (p, pixel)
            h = p.s / 2
            box = item.pixels[int(cy - h) - 1:int(cy + h) + 2, int(cx - h) - 1:int(cx + h) + 2].astype(int)
            interior = np.all(np.abs(box - p.rgb) <= 1, axis=-1).sum()
            assert _area(p.shape, p.s - 3) <= interior <= _area(p.shape, p.s + 1), (p, interior)
            far &= np.maximum(np.abs(xx - cx), np.abs(yy - cy)) > h + 2
        assert item.pixels[far].min() >= 200
    assert counts == {1, 2, 3}


def test_edge_ramp_changes_only_the_edges():
    """Guards against the training-only edge variation (hard or wider anti-aliasing) changing what is drawn
    (objects, captions, answers) or leaving blended pixels with hard edges."""
    for seed in range(5):
        soft, hard, wide = (render.sample_image(np.random.default_rng(seed), ramp=r) for r in (1.0, 0.0, 2.0))
        assert soft.caption == hard.caption == wide.caption and soft.qa == hard.qa == wide.qa
        rgbs = {p.rgb for p in hard.placed}
        px = hard.pixels.reshape(-1, 3)
        exact = np.array([tuple(v) in rgbs for v in px.tolist()])
        assert (exact | (px.min(1) >= 200)).all()  # object colour or background, nothing in between
        assert not np.array_equal(soft.pixels, hard.pixels) and not np.array_equal(soft.pixels, wide.pixels)
        assert abs(int(exact.sum()) - sum(_area(p.shape, p.s) for p in hard.placed)) <= 0.1 * exact.sum()
    v = render.sample_video(np.random.default_rng(0), ramp=0.0)
    assert v.caption == render.sample_video(np.random.default_rng(0)).caption


def test_videos_follow_the_spec(videos):
    """Guards against objects leaving the frame, overlapping, wrong travel distance or a changing background."""
    motions = set()
    for v in videos:
        assert v.frames.shape == (16, 128, 128, 3) and v.frames.dtype == np.uint8
        assert 1 <= len(v.placed) <= 2
        for p in v.placed:
            motions.add(p.motion)
            (x0, y0), (x1, y1) = p.centres[0], p.centres[-1]
            dist = math.hypot(x1 - x0, y1 - y0)
            ux, uy = spec.MOTION_VECTOR[p.motion]
            if p.motion == "still":
                assert dist == 0
            else:
                assert 40 <= dist <= 56 and (x1 - x0) * ux + (y1 - y0) * uy == pytest.approx(dist)
            steps = np.diff(np.asarray(p.centres), axis=0)
            assert np.allclose(steps, steps[0])  # straight line, constant speed
            h = p.s / 2
            for t, (cx, cy) in enumerate(p.centres):
                assert h <= cx <= 128 - h and h <= cy <= 128 - h
                pixel = v.frames[t, int(cy), int(cx)].astype(int)
                assert np.all(np.abs(pixel - spec.COLOURS[p.colour]) <= 20)
        if len(v.placed) == 2:
            a, b = v.placed
            r = (a.s + b.s) / 2
            for pa_, pb_ in zip(a.centres, b.centres):
                assert abs(pa_[0] - pb_[0]) >= r or abs(pa_[1] - pb_[1]) >= r
        corners = v.frames[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # no object reaches a corner pixel
        assert np.array_equal(corners, np.broadcast_to(corners[:1], corners.shape))
    assert motions == set(spec.MOTIONS)


def test_captions_are_canonical(images, videos):
    """Guards against captions out of cell order or with the wrong joining words."""
    for item in images:
        assert [o[3] for o in item.objects] == sorted(o[3] for o in item.objects)
        phrases = [f"a {sz} {c} {sh} {spec.CELL_WHERE[cell]}" for c, sh, sz, cell in item.objects]
        expected = {1: "{}.", 2: "{} and {}.", 3: "{}, {} and {}."}[len(phrases)].format(*phrases)
        assert item.caption == expected
    for v in videos:
        keys = [(_cell(*p.centres[0]), p.centres[0][1], p.centres[0][0]) for p in v.placed]
        assert keys == sorted(keys)
        words = {"still": "stays still"}
        phrases = [f"a {p.size} {p.colour} {p.shape} {words.get(p.motion, 'moves ' + p.motion)}" for p in v.placed]
        assert v.caption == " and ".join(phrases) + "."
    assert images[0].caption.startswith("a ") and images[0].caption.endswith(".")


def test_questions_and_answers_match_the_objects(images, videos):
    """Guards against missing templates, questions asked when their condition fails, or wrong answers."""
    for item in images:
        qa = dict(item.qa)
        assert len(qa) == len(item.qa)  # no duplicate question
        objs = item.objects
        n_words = ["zero", "one", "two", "three"]
        assert qa.pop("how many objects are there?") == n_words[len(objs)]
        for sh in spec.SHAPES:
            same = [o for o in objs if o[1] == sh]
            assert qa.pop(f"how many {sh}s are there?") == n_words[len(same)]
            if len(same) == 1:
                assert qa.pop(f"what color is the {sh}?") == same[0][0]
        for c in spec.COLOURS:
            same = [o for o in objs if o[0] == c]
            if len(same) == 1:
                assert qa.pop(f"what shape is the {c} object?") == same[0][1]
        for c, sh, sz, cell in objs:
            assert qa.pop(f"where is the {c} {sh}?") == spec.CELL_ANSWER[cell]
            assert qa.pop(f"is the {c} {sh} small or large?") == sz
            assert qa.pop(f"is there a {c} {sh}?") == "yes"
        assert sorted(qa.values()) == ["no"] * len(objs)  # the negatives, one per object
        assert all(q.startswith("is there a ") for q in qa)
    for v in videos:
        qa = dict(v.qa)
        assert qa.pop("how many objects are there?") == ["one", "two"][len(v.objects) - 1]
        assert qa == {f"which way does the {c} {sh} move?": m for c, sh, sz, m, cell in v.objects}


def test_tokenizer_round_trip_and_vocabulary(images, videos):
    """Guards against a word missing from vocabulary() (an <unk> at training) or a lossy detokenize."""
    vocab = set(spec.vocabulary())
    texts = [spec.IMAGE_PROMPT, spec.VIDEO_PROMPT]
    for item in [*images, *videos]:
        texts += [item.caption] + [t for pair in item.qa for t in pair]
    for text in texts:
        words = spec.tokenize_words(text)
        assert spec.detokenize(words) == text
        assert set(words) <= vocab, set(words) - vocab
    assert spec.tokenize_words("a red circle at the top left, a b.") == [
        "a", "red", "circle", "at", "the", "top", "left", ",", "a", "b", "."]
    assert {",", ".", "?", "zero", "stays", "color"} <= vocab


def test_scorer_parses_truth_and_penalises_errors(images, videos):
    """Guards against a scorer that is lenient (perfect on wrong text) or that cannot read canonical captions."""
    for item in images:
        want = sorted((sz, c, sh, cell) for c, sh, sz, cell in item.objects)
        assert sorted(score.parse_caption(item.caption, "image")) == want
    for v in videos:
        want = sorted((sz, c, sh, m) for c, sh, sz, m, _ in v.objects)
        assert sorted(score.parse_caption(v.caption, "video")) == want
    items = [(f"mem://i{k}.png", "image", it) for k, it in enumerate(images[:20])]
    items += [(f"mem://v{k}.mp4", "video", it) for k, it in enumerate(videos[:10])]
    truth = {u: {"uri": u, "media_type": m, "caption": it.caption, "questions": [q for q, _ in it.qa],
                 "answers": [a for _, a in it.qa]} for u, m, it in items}

    def rows(caption_of, answer_of):
        for u, m, it in items:
            yield {"uri": u, "media_type": m, "task": "caption", "prompt": "p", "text": caption_of(it), "status": "ok"}
            for q, a in it.qa:
                yield {"uri": u, "media_type": m, "task": "vqa", "prompt": q, "text": answer_of(a), "status": "ok"}

    perfect = score.score_rows(rows(lambda it: it.caption, lambda a: f" {a.upper()}"), truth)
    for key in ("image_caption_f1", "video_caption_f1", "image_caption_exact", "video_caption_exact",
                "image_vqa_acc", "video_vqa_acc", "vqa_acc"):
        assert perfect[key] == 1.0, key
    assert perfect["n_missing"] == 0 and perfect["counts"]["image_caption"] == 20

    swap = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green"}
    first_colour = lambda it: " ".join(swap.get(w, w) if i == 2 else w for i, w in enumerate(it.caption.split(" ")))
    wrong = score.score_rows(rows(first_colour, lambda a: "no" if a == "yes" else a), truth)
    assert wrong["image_caption_f1"] < 1 and wrong["video_caption_f1"] < 1
    assert wrong["image_caption_exact"] == 0 and wrong["image_vqa_acc"] < 1 and wrong["video_vqa_acc"] == 1

    some = list(rows(lambda it: it.caption, lambda a: a))
    some[0] = {**some[0], "text": None, "status": "error"}
    dropped = [r for r in some if not (r["uri"] == "mem://v0.mp4" and r["task"] == "vqa")]
    partial = score.score_rows(dropped, truth)
    assert partial["counts"]["n_errors"] == 1 and partial["n_missing"] == len(videos[0].qa)
    assert partial["image_caption_exact"] == pytest.approx(19 / 20) and partial["video_vqa_acc"] < 1


def test_write_corpus_round_trip(tmp_path):
    """Guards against unreadable media, wrong frame counts, a manifest out of step with its files, non-determinism."""
    out = str(tmp_path / "c1")
    manifest_uri = corpus.write_corpus(out, num_images=12, num_videos=3, seed=5)
    entries = corpus.read_manifest(manifest_uri)
    assert [e["media_type"] for e in entries] == ["image"] * 12 + ["video"] * 3
    exts = set()
    for k, e in enumerate(entries):
        assert set(e) >= {"uri", "media_type", "caption", "questions", "answers", "objects"}
        assert e["uri"].startswith("file:///") and len(e["questions"]) == len(e["answers"])
        with fsspec.open(e["uri"], "rb") as f:
            data = f.read()
        kind = corpus.IMAGE_KIND if e["media_type"] == "image" else corpus.VIDEO_KIND
        item = (render.sample_image if kind == corpus.IMAGE_KIND else render.sample_video)(
            np.random.default_rng([5, kind, k if kind == corpus.IMAGE_KIND else k - 12]))
        assert e["caption"] == item.caption and list(zip(e["questions"], e["answers"])) == list(item.qa)
        assert [(o["colour"], o["shape"], o["size"], o["cell"]) for o in e["objects"]] == [o[:3] + o[-1:] for o in item.objects]
        if e["media_type"] == "image":
            exts.add(e["uri"].rsplit(".", 1)[1])
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert pixels.shape == (128, 128, 3)
            if e["uri"].endswith(".png"):
                assert np.array_equal(pixels, item.pixels)
            else:
                assert np.abs(pixels.astype(int) - item.pixels).mean() < 4
        else:
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
                assert stream.average_rate == 8
                frames = [fr.to_ndarray(format="rgb24") for fr in container.decode(stream)]
            assert len(frames) == 16 and frames[0].shape == (128, 128, 3)
            assert np.abs(np.stack(frames).astype(int) - item.frames).mean() < 4
    assert exts == {"png", "jpg"}
    again = corpus.write_corpus(str(tmp_path / "c2"), num_images=12, num_videos=3, seed=5)
    for a, b in zip(entries, corpus.read_manifest(again)):
        assert json.dumps({**a, "uri": None}) == json.dumps({**b, "uri": None})
        with fsspec.open(a["uri"], "rb") as fa, fsspec.open(b["uri"], "rb") as fb:
            assert fa.read() == fb.read()


def test_score_parquet_reads_pipeline_output(tmp_path):
    """Guards against the Parquet scorer missing rows or mis-reading columns of the pipeline output."""
    manifest_uri = corpus.write_corpus(str(tmp_path / "c"), num_images=3, num_videos=1, seed=1)
    entries = corpus.read_manifest(manifest_uri)
    rows = []
    for e in entries:
        rows.append({"uri": e["uri"], "media_type": e["media_type"], "task": "caption",
                     "prompt": spec.IMAGE_PROMPT, "text": e["caption"], "status": "ok"})
        rows += [{"uri": e["uri"], "media_type": e["media_type"], "task": "vqa", "prompt": q,
                  "text": a, "status": "ok"} for q, a in zip(e["questions"], e["answers"])]
    rows[0] = {**rows[0], "text": None, "status": "error"}
    out = tmp_path / "labels"
    out.mkdir()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 10), out / "part-0.parquet")
    pq.write_table(table.slice(10), out / "part-1.parquet")
    (out / "_summary.json").write_text("{}")
    result = score.score_parquet(str(out), manifest_uri)
    assert result["image_caption_exact"] == pytest.approx(2 / 3) and result["vqa_acc"] == 1.0
    assert result["video_caption_f1"] == 1.0 and result["n_missing"] == 0
    assert sum(result["counts"][k] for k in ("image_caption", "video_caption", "image_vqa", "video_vqa")) == len(rows)


def test_write_corpus_through_a_non_local_filesystem():
    """Guards against open()/os.path on user paths: the corpus must go through fsspec to any filesystem."""
    manifest_uri = corpus.write_corpus("memory://shapes-test/c", num_images=2, num_videos=1, seed=0)
    entries = corpus.read_manifest(manifest_uri)
    assert manifest_uri.startswith("memory://") and len(entries) == 3
    for e in entries:
        with fsspec.open(e["uri"], "rb") as f:
            assert len(f.read()) > 100
    fsspec.filesystem("memory").rm("/shapes-test", recursive=True)
