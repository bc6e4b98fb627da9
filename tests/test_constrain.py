"""Structured answers: choices and JSON schemas through llguidance's token masks, on both kinds of tokenizer.

The word-level one is the bundled tiny-shapes' (a trained model: its constrained answers are real answers); the
byte-level BPE one is a tiny random LLaVA-OneVision written by transformers' save_pretrained
(tests/onevision_fixture.py). Every check of a text is independent of the code under test: membership in the
choices, json.loads and jsonschema.
"""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from workers.anyres import anyres_tiles
from lavi.bundled import DEFAULT_MODEL
from lavi.serving.constrain import ConstraintError
from lavi.serving.engine import Engine
from lavi.serving.steps import GenerationConfig
from onevision_fixture import make_onevision
from pipeline.config import RunConfig
from schemas.constraint import Constraint, vocabulary_gap

pytestmark = pytest.mark.timeout(300)

COLOURS = ["red", "green", "blue", "yellow"]
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "shapes": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
          "required": ["colour", "count"], "additionalProperties": False}


@pytest.fixture(scope="module")
def shapes_engine():
    return Engine.load(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    return make_onevision(tmp_path_factory.mktemp("ov-constrain"))


@pytest.fixture(scope="module")
def ov_engine(ov_dir):
    return Engine.load(str(ov_dir))


def _meets(c: Constraint | None, text: str) -> bool:
    if c is None:
        return True
    if c.choices:
        return text in c.choices
    try:
        jsonschema.validate(json.loads(text), c.schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def _shapes_clip(engine: Engine, seed: int) -> np.ndarray:
    from shapes.render import sample_image

    pixels = sample_image(np.random.default_rng(seed)).pixels
    assert pixels.shape[0] == engine.image_size
    return pixels[None]


@pytest.mark.parametrize("inflight", [True, False])
def test_word_level_mixed_batch(shapes_engine, inflight):
    """Guards against a constrained row that leaves its choices, a free row that a neighbour's mask changes, and
    choices that share a first letter ("two"/"three": llguidance forces a byte no word-level token is)."""
    e = shapes_engine
    e.inflight = inflight
    clips = [_shapes_clip(e, s) for s in range(3)]
    asks = [(i, q) for i in range(3) for q in ("what color is the circle?", "describe the image.",
                                               "how many objects are there?")]
    rules = [Constraint.of(COLOURS), None, Constraint.of(["one", "two", "three"])] * 3
    gen = GenerationConfig(max_new_tokens=48)
    got = e.generate(clips, asks, gen, constraints=rules)
    free = e.generate(clips, asks, gen)
    for g, f, c in zip(got, free, rules):
        if c is None:
            assert g.text == f.text  # the free rows generate as they do with no constraint in the batch
        else:
            assert g.finished and g.violation is None and _meets(c, g.text), (g.text, c)
    assert {g.text for g, c in zip(got, rules) if c is not None and c.choices == tuple(COLOURS)} <= set(COLOURS)


def test_word_level_refusals(shapes_engine):
    """Guards against a JSON schema on a vocabulary that cannot spell JSON, or a choice with a word the model
    lacks, going on to produce text that breaks it instead of being refused by name."""
    vocab = shapes_engine.vocabulary
    with pytest.raises(ConstraintError, match="word level"):
        vocab.grammar(Constraint.of(json_schema={"type": "object"}))
    with pytest.raises(ConstraintError, match="purple"):
        vocab.grammar(Constraint.of(["red", "purple"]))


@pytest.mark.parametrize("engine", ["shapes_engine", "ov_engine"])
def test_the_driver_and_the_engine_refuse_the_same_constraints(engine, request):
    """Guards against the driver's check of a run's constraint (schemas.constraint.vocabulary_gap, tokenizer.json
    only) and the engine's (its compiled grammar) drifting apart: a run refused that the model could answer, or one
    let through whose every row is then an infer error."""
    vocab = request.getfixturevalue(engine).vocabulary
    for c in [Constraint.of(["one", "two", "three"]), Constraint.of(["a red square.", "no"]),
              Constraint.of(["one", "four", "Five", "two"]), Constraint.of(["purple"]), Constraint.of(["?!"]),
              Constraint.of(json_schema={"type": "object"})]:
        gap = vocabulary_gap(c, vocab.hf)
        try:
            vocab.grammar(c)
        except ConstraintError as err:
            assert gap is not None, (c, err)
        else:
            assert gap is None, (c, gap)
    gap = vocabulary_gap(Constraint.of(["one", "four", "Five", "two"]), request.getfixturevalue(engine).vocabulary.hf)
    assert gap is None or "['four', 'Five']" in gap, gap  # every word it lacks, in order, once


def test_a_run_whose_choices_the_model_lacks_is_refused_before_listing(tmp_path, monkeypatch):
    """Guards against issue #34: `--choices one,two,three,four,five` with the bundled model (no 'four' or 'five'
    in its vocabulary) listing and labelling every item into an infer error row, instead of refusing the run."""
    from PIL import Image

    import pipeline.driver
    from jobs.cli import main

    corpus = tmp_path / "imgs"
    corpus.mkdir()
    Image.new("RGB", (32, 32), "red").save(corpus / "0.png")

    def never(*args, **kwargs):
        raise AssertionError("the run went on past its check of --choices")

    monkeypatch.setattr(pipeline.driver, "check_inputs", never)  # the first step after the model's checks
    monkeypatch.setattr(pipeline.driver, "connect_ray", never)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(corpus), "--out", str(out), "--task", "vqa", "--question",
                                    "how many objects are there?", "--choices", "one,two,three,four,five"])
    assert res.exit_code == 2, res.output  # a usage error
    message = res.output.strip().splitlines()[-1]
    assert "['four', 'five']" in message and "tiny-shapes" in message and "--choices" in message, res.output
    assert not out.exists()


@pytest.mark.parametrize("inflight", [True, False])
def test_byte_level_bpe_mixed_batch(ov_engine, inflight):
    """Guards against JSON that does not validate (a random model, so only the mask makes it valid), a choice
    broken across BPE merges, and free rows changed by the constrained ones beside them."""
    e = ov_engine
    e.inflight = inflight
    rng = np.random.default_rng(0)
    sizes = [(50, 70), (35, 35), (90, 40)]
    imgs = [(rng.random((*s, 3)) * 255).astype(np.uint8) for s in sizes]
    visuals = [anyres_tiles(im, e.pinpoints, e.image_size) for im in imgs]
    media = [("image", s) for s in sizes]
    asks = [(i, q) for i in range(3) for q in ("what colour is the square?", "describe the image.", "how many?")]
    rules = [Constraint.of(["red circle", "blue triangle", "two"]), None, Constraint.of(json_schema=SCHEMA)] * 3
    gen = GenerationConfig(max_new_tokens=40)
    got = e.generate(visuals, asks, gen, media, constraints=rules)
    free = e.generate(visuals, asks, gen, media)
    for g, f, c in zip(got, free, rules):
        if c is None:
            assert g.text == f.text
        else:
            assert g.finished and g.violation is None and _meets(c, g.text), (g.text, c)


def test_the_check_of_a_finished_text():
    """Guards against the last check (what makes a row an error instead of ok) passing a text that breaks its
    constraint."""
    c = Constraint.of(json_schema=SCHEMA)
    assert c.check('{"colour": "red", "count": 3}') is None
    assert "not JSON" in c.check('{"colour": "red", ')
    assert "validate" in c.check('{"colour": "green", "count": 3}')
    choices = Constraint.of(["a red square.", "no"])
    assert choices.check("no") is None and choices.check("yes") is not None
    assert choices.check("a red square .") is not None and choices.check("a red square .", ["a red square ."]) is None
    assert Constraint.parse(c.to_json()) == c and Constraint.parse(None) is None


def test_constraint_options_are_checked_up_front():
    """Guards against a malformed --choices or --json-schema reaching the workers."""
    base = dict(inputs=("x",), out="o")
    assert RunConfig(**base, choices="red, blue ,green").choices == ("red", "blue", "green")
    assert RunConfig(**base, choices='["a, b", "c"]').choices == ("a, b", "c")
    for bad, match in [(dict(choices="a", json_schema="{}"), "not both"), (dict(json_schema='{"type": 5}'), "valid"),
                       (dict(json_schema="[1]"), "object"), (dict(json_schema="{nope"), "not JSON")]:
        with pytest.raises(ValueError, match=match):
            RunConfig(**base, **bad)


def _corpus(tmp_path: Path) -> Path:
    from shapes.corpus import write_corpus

    manifest = Path(write_corpus(str(tmp_path / "corpus"), 6, 2, seed=5).removeprefix("file://"))
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    for e in entries:
        e["questions"] = ["how many objects are there?", {"question": "what color is the circle?", "choices": COLOURS},
                          {"question": "is there a square?", "choices": ["yes", "no"]}]
    entries[0]["questions"].append({"question": "bad", "choices": []})  # refuses its item at listing
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return manifest


def test_pipeline_rows_meet_their_manifest_constraints(ray_local, tmp_path):
    """End to end with per-question choices from a manifest, beside a free question in the same blocks: every ok
    row meets its own constraint, the free one is free, and a malformed question refuses only its item."""
    from pipeline.driver import run

    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(str(_corpus(tmp_path)),), out=str(out), task="vqa", max_new_tokens=16,
                            batch_size=8, address=ray_local))
    rows = pq.read_table(out).to_pylist()
    assert summary["items_with_own_constraints"] == 7  # the refused item asks nothing
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 1 and errors[0]["error_stage"] == "list" and "choices" in errors[0]["error"], errors
    by_q: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] != "error":
            by_q.setdefault(r["prompt"], []).append(r["text"])
    assert set(by_q["what color is the circle?"]) <= set(COLOURS) and len(by_q["what color is the circle?"]) == 7
    assert set(by_q["is there a square?"]) <= {"yes", "no"}
    assert all(t for t in by_q["how many objects are there?"])


def test_cli_json_schema_on_a_onevision(ray_local, ov_dir, tmp_path):
    """`run --json-schema FILE --model OV_DIR`: every ok row is JSON that validates; the schema is recorded with
    the run's settings (a resume with another one is refused)."""
    from jobs.cli import main
    from PIL import Image

    corpus = tmp_path / "imgs"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i, size in enumerate([(40, 60), (35, 35), (120, 50)]):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(corpus / f"{i}.png")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    out = tmp_path / "out"
    args = ["run", str(corpus), "--out", str(out), "--model", str(ov_dir), "--task", "vqa", "--question", "what?",
            "--question", "how many?", "--json-schema", str(schema), "--max-new-tokens", "40", "--address", ray_local,
            "--no-report"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}, [(r["status"], r["error"]) for r in rows]
    for r in rows:
        jsonschema.validate(json.loads(r["text"]), SCHEMA)
    meta = json.loads(pq.read_schema(next(out.glob("part-*.parquet"))).metadata[b"lavi_label.generation"])
    assert json.loads(meta["constraint"]) == {"json_schema": SCHEMA}
    k = args.index("--json-schema")
    again = CliRunner().invoke(main, args[:k] + ["--choices", "one,two"] + args[k + 2:])
    assert again.exit_code != 0 and "settings" in again.output, again.output


def test_retry_keeps_the_runs_choices(ray_local, tmp_path):
    """Guards against a retry that relabels error rows free of the constraint their run had."""
    import shutil

    from pipeline.driver import run
    from pipeline.retry import retry
    from shapes.corpus import write_corpus

    manifest = Path(write_corpus(str(tmp_path / "corpus"), 3, 0, seed=6).removeprefix("file://"))
    images = sorted((tmp_path / "corpus" / "images").iterdir())
    entries = [{"uri": json.loads(x)["uri"]} for x in manifest.read_text().splitlines()]
    entries.append({"uri": str(images[0].with_name("missing.png"))})
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = tmp_path / "out"
    q = "what color is the circle?"
    first = run(RunConfig(inputs=(str(manifest),), out=str(out), task="vqa", questions=(q,), choices="red,blue",
                          max_new_tokens=8, address=ray_local))
    assert first["error_stage"] == {"read": 1}, first["error_stage"]
    before = {r["row_id"] for r in pq.read_table(out).to_pylist()}
    shutil.copy(images[0], images[0].with_name("missing.png"))
    summary = retry(str(out), ("read",), address=ray_local)
    rows = pq.read_table(out).to_pylist()
    assert summary["retry"]["rows_replaced"] == 1 and len(rows) == 4
    assert {r["row_id"] for r in rows} == before  # the row_id hashes the constraint: the same rows, constrained
    assert {r["status"] for r in rows} == {"ok"} and {r["text"] for r in rows} <= {"red", "blue"}
