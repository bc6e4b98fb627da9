"""Training data in the ecosystem's formats: pipeline output, LLaVA conversation JSON, conversation Parquet with
embedded images; multi-turn conversations rendered through the chat template; broken records counted, never fatal."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main
from lavi.serving.chat_template import ChatTemplate, Turns
from lavi.core.config import LaViConfig
from lavi.serving.prompts import prompt_ids
from lavi.serving.tokenizer import Tokenizer
from shapes.corpus import encode_image
from shapes.render import sample_image
from tests.onevision_fixture import QWEN2_TEMPLATE, write_tokenizer
from workers.train_data import TrainData, Unusable, conversation_pairs, read_records

LLAVA_TURNS = [{"from": "human", "value": "<image>\nwhat colour is the square?"}, {"from": "gpt", "value": "red."},
               {"from": "human", "value": "how many shapes are there?"}, {"from": "gpt", "value": "two."}]


def _images(tmp_path, n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        data, ext = encode_image(sample_image(rng).pixels, rng)
        (tmp_path / f"img{i}.{ext}").write_bytes(data)
        out.append((f"img{i}.{ext}", data))
    return out


def test_conversation_turns_become_one_target_per_answer_with_earlier_turns_as_context():
    """Guards against multi-turn data losing turns, keeping media placeholders in the text, training on the
    human's turns, or taking a malformed conversation silently."""
    pairs = conversation_pairs([{"from": "system", "value": "be brief"}] + LLAVA_TURNS)
    assert pairs == (("what colour is the square?", "red."),
                     (Turns((("what colour is the square?", "red."),), "how many shapes are there?"), "two."))
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "a red circle."}]}]
    assert conversation_pairs(typed) == (("describe the image.", "a red circle."),)
    for bad, reason in (([{"from": "gpt", "value": "hi"}], "does not start with a user"),
                        ([{"from": "human", "value": "<image>\nhi"}], "no assistant answer"),
                        ([{"from": "robot", "value": "hi"}], "unknown role")):
        with pytest.raises(Unusable, match=reason):
            conversation_pairs(bad)


def test_a_turns_prompt_renders_as_transformers_renders_the_conversation(tmp_path):
    """Guards against earlier turns rendered otherwise than the checkpoint's own chat template does (wrong roles,
    the image in a later turn, a missing generation prompt): the context a model is trained on must be the one
    it is prompted with."""
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red."}]},
                {"role": "user", "content": [{"type": "text", "text": "how many?"}]}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = Turns((("what colour is it?", "red."),), "how many?")
    assert ChatTemplate(QWEN2_TEMPLATE).render(prompt, "image") == expected
    assert ChatTemplate(QWEN2_TEMPLATE).render("how many?", "image") == reference.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]}],
        tokenize=False, add_generation_prompt=True)


def test_a_turns_prompt_in_a_models_own_format_is_the_turns_it_would_have_generated(tiny_model):
    """Guards against a LaVi without a chat template dropping a conversation's earlier turns."""
    config = LaViConfig.from_dict(json.loads(open(f"{tiny_model}/config.json").read()))
    tok = Tokenizer(tiny_model)
    first, later = prompt_ids(config, tok, "describe the image."), prompt_ids(config, tok, "how many shapes?")
    turns = prompt_ids(config, tok, Turns((("describe the image.", "a red circle."),), "how many shapes?"))
    answer = tok.encode("a red circle.") + [config.eos_token_id]
    assert turns == first + answer + later[1 if config.bos_token_id is not None else 0:]


def test_llava_json_and_conversation_parquet_read_with_broken_records_counted(tmp_path):
    """Guards against the LLaVA layouts being unreadable (relative paths under --image-root, `images` as a list
    of {bytes, path}, `messages` with typed content) and against a missing or broken image, or a record with none,
    failing the run instead of being counted and skipped."""
    (name0, _), (name1, data1) = _images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    rows = [{"id": "a", "image": name0, "conversations": LLAVA_TURNS},
            {"id": "b", "image": "missing.png", "conversations": LLAVA_TURNS[:2]},
            {"id": "c", "image": "broken.png", "conversations": LLAVA_TURNS[:2]},
            {"id": "d", "conversations": LLAVA_TURNS[:2]},  # text only
            {"id": "e", "image": [name0, name1], "conversations": LLAVA_TURNS[:2]}]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="--image-root"):
        read_records(str(tmp_path / "llava.json"))
    data = TrainData(str(tmp_path / "llava.json"), image_size=32, frames=1, batch_items=8,
                     image_root=str(tmp_path))
    assert data.format == "LLaVA conversation JSON" and len(data.records) == 3
    batch = data(0)
    assert len(batch) == 1 and batch[0].frames.shape == (1, 32, 32, 3) and len(batch[0].pairs) == 2
    assert data.summary()["skipped"] == {"no image or video": 1, "several images (one per example is supported)": 1,
                                         "read error": 1, "decode error": 1}
    assert len(data(1)) == 1  # the broken ones are not drawn again, nor counted twice
    assert sum(data.summary()["skipped"].values()) == 4

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red circle."}]}]
    table = pa.table({"images": [[{"bytes": data1, "path": name1}], []],
                      "messages": [json.loads(json.dumps(messages))] * 2})
    pq.write_table(table, tmp_path / "conv.parquet")
    conv = TrainData(str(tmp_path / "conv.parquet"), image_size=32, frames=1)
    assert conv.format == "conversation Parquet" and conv.summary()["skipped"] == {"no image or video": 1}
    assert conv(0)[0].pairs == (("describe the image.", "a red circle."),)


def test_pipeline_output_trains_on_its_ok_rows_one_item_with_all_its_targets(tmp_path):
    """Guards against the pipeline's own output being unusable as training data, error or truncated rows
    becoming targets, or an item's caption and answers split over separate examples."""
    (name0, _), (name1, _) = _images(tmp_path, 2)
    out = tmp_path / "labels"
    out.mkdir()
    rows = [(name0, "caption", "describe the image.", "a red circle.", "ok"),
            (name0, "vqa", "what colour is the circle?", "red.", "ok"),
            (name1, "caption", "describe the image.", "a blue star and", "truncated"),
            ("gone.png", "caption", "describe the image.", None, "error")]
    table = pa.table({"item_id": [r[0] for r in rows], "uri": [str(tmp_path / r[0]) for r in rows],
                      "media_type": ["image"] * 4, "clip_index": pa.array([None] * 4, pa.int32()),
                      "task": [r[1] for r in rows], "prompt": [r[2] for r in rows], "text": [r[3] for r in rows],
                      "status": [r[4] for r in rows]})
    pq.write_table(table.slice(0, 2), out / "part-00000.parquet")
    pq.write_table(table.slice(2), out / "part-00001.parquet")
    read = read_records(str(out))
    assert read.format == "pipeline output" and read.skipped == {"status truncated": 1, "status error": 1}
    assert [r.pairs for r in read.records] == [(("describe the image.", "a red circle."),
                                                ("what colour is the circle?", "red."))]
    ck = tmp_path / "ck"
    result = CliRunner().invoke(main, ["train", "--out", str(ck), "--data", str(out), "--steps", "1",
                                       "--warmup", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((ck / "train_summary.json").read_text())["data"]
    assert summary["format"] == "pipeline output" and summary["targets"] == 2


def test_train_command_on_llava_json_and_unusable_data(tmp_path):
    """Guards against `train --data X.json --image-root` not reaching training, and data with nothing usable
    failing with a traceback instead of a message that says why."""
    (name0, _), = _images(tmp_path, 1)
    (tmp_path / "llava.json").write_text(json.dumps([{"image": name0, "conversations": LLAVA_TURNS}]))
    base = ["train", "--steps", "1", "--warmup", "1", "--threads", "1"]
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "ck"), "--data", str(tmp_path / "llava.json"),
                                              "--image-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (tmp_path / "none.json").write_text(json.dumps([{"conversations": LLAVA_TURNS}]))
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "ck2"), "--data", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "no usable training records (1 no image or video)" in result.output, result.output
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "ck3"), "--data", str(tmp_path / "other.parquet")])
    assert result.exit_code == 2 and "not a training format" in result.output, result.output
