"""pipeline.sources and pipeline.config: INPUT specs -> items, prompts, validation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.storage_options import parse_storage_options
from pipeline.sources import PromptSpec, iter_items
from schemas.clips import ITEM_ROWS
from schemas.manifest import ITEM_SCHEMA
from schemas.rows import item_id
from workers.decode import DecodeSettings
from workers.units import decode_batch


def _tree(root) -> None:
    (root / "a" / "deep").mkdir(parents=True)
    for rel in ("x.png", "a/y.JPG", "a/deep/z.mp4", "a/notes.txt", "b.mov"):
        (root / rel).write_bytes(b"not really media")


def test_directory_walk_is_recursive_sorted_and_skips_non_media(tmp_path):
    """Guards against a walk that stops at the top level, yields README/sidecar files as items, or
    changes order between runs (file names and resume rely on a stable listing)."""
    _tree(tmp_path)
    items = list(iter_items([str(tmp_path)], PromptSpec()))
    uris = [i["uri"] for i in items]
    assert [u.rsplit("/", 1)[1] for u in uris] == ["b.mov", "x.png", "y.JPG", "z.mp4"]
    assert all(u.startswith("file:///") for u in uris)
    assert [i["media_type"] for i in items if i["uri"].endswith(".mp4")] == ["video"]
    assert all(i["item_id"] == item_id(i["uri"]) for i in items)
    assert uris == [i["uri"] for i in iter_items([str(tmp_path)], PromptSpec())]
    for extra in ("README", "a/deep/w.npy", "a/v.npy"):
        (tmp_path / extra).write_bytes(b"x")
    stats: dict = {}
    list(iter_items([str(tmp_path)], PromptSpec(), stats=stats))
    assert stats["non_media"] == {".txt": 1, ".npy": 2, "(none)": 1} and stats["listed"] == 4


def test_glob_and_file_and_prefix_uri_and_duplicates(tmp_path):
    """Guards against globs matching non-matching files, file:// prefixes not walked, and the same
    file listed by two INPUTs being labeled twice (duplicate rows)."""
    _tree(tmp_path)
    globbed = list(iter_items([f"{tmp_path}/**/*.mp4"], PromptSpec()))
    assert [i["uri"].rsplit("/", 1)[1] for i in globbed] == ["z.mp4"]
    assert [i["uri"].rsplit("/", 1)[1] for i in iter_items([f"{tmp_path}/*/*.JPG"], PromptSpec())] == ["y.JPG"]
    assert [i["uri"].rsplit("/", 1)[1] for i in iter_items([f"{tmp_path}/*"], PromptSpec())] == ["b.mov", "x.png"]
    both = list(iter_items([f"file://{tmp_path}/a", str(tmp_path / "a" / "y.JPG")], PromptSpec()))
    assert sorted(i["uri"].rsplit("/", 1)[1] for i in both) == ["y.JPG", "z.mp4"]


def test_missing_input_raises():
    """Guards against a typo in INPUT silently producing an empty run."""
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_items(["/nonexistent/dir/for/lavi"], PromptSpec()))


def test_manifest_prompts_caption_and_vqa(tmp_path):
    """Guards against per-item questions being dropped, CLI questions not added to every item,
    relative manifest uris resolved against the cwd, and a vqa item without questions vanishing."""
    (tmp_path / "img.png").write_bytes(b"x")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"uri": "img.png", "questions": ["what color is the circle?"]},
        {"uri": str(tmp_path / "v.mp4"), "prompt": "describe it."},
        {"uri": "s3://bucket/k.weird"},
    ]) + "\n")
    vqa = list(iter_items([str(manifest)], PromptSpec(task="vqa", questions=("how many objects are there?",))))
    assert vqa[0]["uri"] == f"file://{tmp_path}/img.png"
    assert [p["prompt"] for p in vqa[0]["prompts"]] == ["how many objects are there?", "what color is the circle?"]
    assert vqa[1]["uri"] == f"file://{tmp_path}/v.mp4"
    assert vqa[2]["media_type"] == "unknown" and vqa[2]["error"] is None
    bare = list(iter_items([str(manifest)], PromptSpec(task="vqa")))
    assert bare[1]["error"] and "no questions" in bare[1]["error"] and len(bare[1]["prompts"]) == 1
    cap = list(iter_items([str(manifest)], PromptSpec(task="caption")))
    assert [i["prompts"] for i in cap[:2]] == [[{"task": "caption", "prompt": None, "constraint": None}],
                                               [{"task": "caption", "prompt": "describe it.", "constraint": None}]]


def test_an_item_refused_when_listed_becomes_a_list_error_row(tmp_path):
    """Guards against a vqa item without questions vanishing, being fetched, or being recorded as a failed read:
    it is one error row of stage "list" (never fetched: its file does not exist, a fetch would say "read")."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": str(tmp_path / "nowhere.png")}) + "\n")
    items = list(iter_items([str(manifest)], PromptSpec(task="vqa")))
    clips = decode_batch(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), DecodeSettings(image_size=8, isolate=False))
    assert clips.num_rows == 1
    row = clips.to_pylist()[0]
    assert (row["status"], row["error_stage"], row[ITEM_ROWS]) == ("error", "list", 1) and "no questions" in row["error"]


def test_csv_and_parquet_manifests(tmp_path):
    """Guards against CSV question lists read as one string and Parquet manifests not supported."""
    (tmp_path / "m.csv").write_text('uri,questions\n/d/a.png,"[""q1?"", ""q2?""]"\n/d/b.png,\n')
    items = list(iter_items([str(tmp_path / "m.csv")], PromptSpec(task="vqa", questions=("q0?",))))
    assert [[p["prompt"] for p in i["prompts"]] for i in items] == [["q0?", "q1?", "q2?"], ["q0?"]]
    pq.write_table(pa.table({"uri": ["/d/a.png", "/d/c.mp4"], "questions": [["q1?"], None]}), tmp_path / "m.parquet")
    items = list(iter_items([str(tmp_path / "m.parquet")], PromptSpec(task="vqa")))
    assert [i["uri"] for i in items] == ["file:///d/a.png", "file:///d/c.mp4"]
    assert items[1]["error"] is not None


def test_run_config_validation_messages():
    """Guards against invalid flags reaching the cluster and failing there, late and obscurely."""
    RunConfig(inputs=("x",), out="o")
    for kwargs, match in [({"task": "ocr"}, "--task"), ({"task": "vqa"}, "needs questions"),
                          ({"questions": ("q?",)}, "--question is for"), ({"batch_size": 0}, "batch-size"),
                          ({"gpus_per_worker": -1.0}, "gpus-per-worker"), ({"top_p": 0.0}, "top-p"),
                          ({"max_error_rate": 2.0}, "max-error-rate"), ({"storage_options": ("novalue",)}, "KEY=VALUE"),
                          ({"clip_seconds": -1.0}, "clip-seconds"), ({"clip_seconds": float("inf")}, "clip-seconds")]:
        with pytest.raises(ValueError, match=match):
            RunConfig(inputs=("x",), out="o", **kwargs)
    with pytest.raises(ValueError, match="INPUT"):
        RunConfig(inputs=(), out="o")
    RunConfig(inputs=("m.jsonl",), out="o", task="vqa")
    RunConfig(inputs=("x",), out="o", clip_seconds=0.0)  # 0: one clip per video, as the README says


def test_auto_batch_and_compile_defaults():
    """Guards the defaults: auto batch is 32 rows on CPU, as `run --help` says, resolved by the driver (the actor
    gets a number) in blocks of four batches, and on a GPU a large block with the actor sizing its batch from memory
    (None); compile is on for GPUs only; `--batch-size auto|N` parses and junk is refused by name."""
    from click.testing import CliRunner

    from jobs.run import BATCH, run as run_cmd
    cpu, gpu = RunConfig(inputs=("x",), out="o"), RunConfig(inputs=("x",), out="o", gpus_per_worker=0.5)
    assert (cpu.batch_size, cpu.block_rows, cpu.labeler_batch, cpu.use_compile) == (None, 128, 32, False)
    assert (gpu.block_rows, gpu.labeler_batch, gpu.use_compile) == (256, None, True)
    fixed = RunConfig(inputs=("x",), out="o", gpus_per_worker=1.0, batch_size=12, compile=False)
    assert (fixed.block_rows, fixed.labeler_batch, fixed.use_compile) == (48, 12, False)
    assert "32 on CPU" in " ".join(CliRunner().invoke(run_cmd, ["--help"]).output.split())
    assert BATCH.convert("auto", None, None) is None and BATCH.convert("7", None, None) == 7
    result = CliRunner().invoke(run_cmd, ["x", "--out", "o", "--batch-size", "many"])
    assert result.exit_code == 2 and "'many' is not a whole number or 'auto'" in result.output


def test_storage_options_parse():
    """Guards against dotted keys (client_kwargs.endpoint_url) not nesting, 'false' being truthy, a number reaching
    the client as a string (s3fs retries="1" fails in range()) and a credential of digits becoming a number."""
    assert parse_storage_options(("client_kwargs.endpoint_url=http://h:1", "anon=false", "key=a=b")) == {
        "client_kwargs": {"endpoint_url": "http://h:1"}, "anon": False, "key": "a=b"}
    assert parse_storage_options(("retries=1", "config_kwargs.retries.max_attempts=2", "default_block_size=1.5e6",
                                  "secret=0123", "key=12", "project=123", "client_kwargs.region_name=1e")) == {
        "retries": 1, "config_kwargs": {"retries": {"max_attempts": 2}}, "default_block_size": 1.5e6,
        "secret": "0123", "key": "12", "project": "123", "client_kwargs": {"region_name": "1e"}}
