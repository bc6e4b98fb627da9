"""End to end on local files: sources -> Ray Data (decode tasks, labeler actors) -> Parquet.

Real parts throughout: a tiny random LaVi, the shapes corpus writer, the session's local Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.driver import run
from pipeline.output import Output
from pipeline.sources import PromptSpec, iter_items
from schemas.clips import CLIP_SCHEMA, ITEM_ROWS
from schemas.rows import LABEL_SCHEMA, read_metadata
from shapes.corpus import write_corpus
from workers.decode import DecodeSettings, fetch_and_decode
from workers.labeler import Labeler, LabelerSpec

pytestmark = pytest.mark.timeout(300)
Q = "how many objects are there?"


def _corpus(root: Path, images: int = 3, videos: int = 2) -> Path:
    """shapes corpus + a corrupt image, an empty file and a missing file in the manifest."""
    manifest = Path(write_corpus(str(root), images, videos, seed=1).removeprefix("file://"))
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "images" / "empty.jpg").write_bytes(b"")
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    lines += [{"uri": str(root / "images" / "corrupt.png"), "questions": ["is it broken?"]},
              {"uri": str(root / "images" / "empty.jpg")},
              {"uri": str(root / "images" / "missing.png")}]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def _expected_rows(config: RunConfig, image_size: int, frames: int) -> int:
    """sum over items of clips x prompts, with clips counted by the decoder itself."""
    settings = DecodeSettings(image_size=image_size, frames_per_clip=frames,
                              clip_seconds=config.clip_seconds or 0.0, isolate=False)
    spec = PromptSpec(config.task, config.prompt, config.questions)
    return sum(len(fetch_and_decode(item, settings)) * len(item["prompts"]) for item in iter_items(config.inputs, spec))


def test_vqa_manifest_end_to_end_with_bad_inputs(ray_local, tiny_model, tmp_path):
    """Guards against dropped rows (n out != clips x prompts), per-item questions ignored, bad inputs
    lost instead of becoming error rows with their stage, output unreadable by pandas/HF datasets,
    and a rerun of a finished job adding rows."""
    from lavi.serving.engine import Engine

    engine = Engine.load(tiny_model)
    manifest = _corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    config = RunConfig(inputs=(str(manifest),), out=str(out), task="vqa", questions=(Q,), model=tiny_model,
                       max_new_tokens=4, batch_size=4, clip_seconds=1.0, rows_per_file=5)
    summary = run(config)
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(LABEL_SCHEMA)
    assert table.num_rows == summary["rows"] == _expected_rows(config, engine.image_size, engine.default_frames)
    assert len(set(table.column("row_id").to_pylist())) == table.num_rows
    rows = table.to_pylist()
    by_uri = {r["uri"].rsplit("/", 1)[1]: r for r in rows if r["status"] == "error"}
    assert by_uri["corrupt.png"]["error_stage"] == "decode" and by_uri["empty.jpg"]["error_stage"] == "decode"
    assert by_uri["missing.png"]["error_stage"] == "read" and by_uri["missing.png"]["text"] is None
    assert {r["prompt"] for r in rows if r["uri"].endswith("corrupt.png")} == {Q, "is it broken?"}
    videos = [r for r in rows if r["media_type"] == "video"]
    assert videos and {r["clip_index"] for r in videos} == {0, 1} and all(r["frame_timestamps_s"] for r in videos)
    ok = [r for r in rows if r["status"] != "error"]
    assert ok and all(r["text"] is not None and r["num_generated_tokens"] > 0 for r in ok)
    assert summary["error_stage"] == {"decode": 3, "read": 1} and summary["status"].get("error") == 4
    meta = read_metadata(pq.read_schema(next(out.glob("part-*.parquet"))).metadata)
    assert meta["model"] == engine.name and meta["generation"]["max_new_tokens"] == 4
    assert not (out / "_tmp").exists() and not (out / "_listing").exists()

    import datasets
    import pandas as pd

    assert len(pd.read_parquet(out)) == table.num_rows
    hf = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == table.num_rows and set(hf.column_names) == set(LABEL_SCHEMA.names)

    again = run(config)
    assert again["this_run"]["rows"] == 0 and again["this_run"]["items_skipped"] == again["items"]
    assert pq.read_table(out).num_rows == table.num_rows
    with pytest.raises(ValueError, match="--overwrite"):
        run(RunConfig(**{**config.__dict__, "max_new_tokens": 5}))


def test_a_corpus_of_bad_and_unusual_files_gives_one_row_each(ray_local, tiny_model, tmp_path):
    """Guards against a hostile or odd file (empty, truncated, random bytes, text named .jpg, decompression
    bombs, 16-bit, CMYK, palette, GIF, EXIF-rotated, 1x1, very wide) or a name with spaces or non-ASCII
    costing the job or its row: the walk finds each, the run completes, one row each with the right status."""
    import media

    root = tmp_path / "in put ünïcode"
    expect: dict[str, tuple[str, str | None]] = {}  # file name -> (status, message in the error)
    for name, (data, message) in {**media.bad_images(), **media.bad_videos(tmp_path)}.items():
        if name.rsplit(".", 1)[1] in ("jpg", "png", "mp4"):  # the walk lists media extensions only
            expect[f"bad {name}"] = ("error", message)
            media.write(root / "bad" / f"bad {name}", data)
    for name, (data, _) in media.unusual_images().items():
        expect[f"ok é {name}"] = ("ok", None)
        media.write(root / "ok" / f"ok é {name}", data)
    expect["clip 日本.mp4"] = ("ok", None)
    media.mp4(root / "clip 日本.mp4", seconds=1)
    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(str(root),), out=str(out), model=tiny_model, max_new_tokens=2, batch_size=8))
    rows = pq.read_table(out).to_pylist()
    got = {r["uri"].rsplit("/", 1)[1]: r for r in rows}
    assert len(rows) == len(got) == len(expect) == summary["rows"], sorted(got)
    for name, (status, message) in expect.items():
        row = got[name]
        if status == "ok":
            assert row["status"] in ("ok", "truncated") and row["text"] is not None, (name, row["error"])
        else:
            assert row["status"] == "error" and row["error_stage"] == "decode" and message in row["error"], row
    assert summary["status"]["error"] == sum(s == "error" for s, _ in expect.values())


def test_caption_directory_uses_model_default_prompts(ray_local, tiny_model, tmp_path):
    """Guards against caption rows without a prompt, or videos captioned with the image prompt."""
    from lavi.serving.engine import Engine

    engine = Engine.load(tiny_model)
    write_corpus(str(tmp_path / "corpus"), 2, 1, seed=2)
    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(str(tmp_path / "corpus"),), out=str(out), model=tiny_model, max_new_tokens=3))
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == summary["rows"] == 3 and summary["status"].get("error", 0) == 0
    assert summary["non_media_files"] == {".jsonl": 1}  # the corpus's manifest, left out of the walk and counted
    work = summary["this_run"]["engine_work"]  # what the labelers computed, for a bench's account of its time
    assert work["prefills"] >= 1 and work["prefill_tokens"] > 0 and work["decode_steps"] >= 2
    assert summary["this_run"]["ray_start_s"] > 0
    assert summary["this_run"]["ray_start_s"] < summary["this_run"]["labeler_ready_s"] < summary["this_run"]["wall_s"]
    for r in rows:
        assert r["task"] == "caption" and r["prompt"] == engine.default_prompt(r["media_type"])
        assert r["status"] == "ok" or (r["status"] == "truncated" and r["num_generated_tokens"] == 3)


def test_labeler_inference_error_becomes_infer_rows(tiny_model):
    """Guards against one bad batch killing the job or losing rows: frames the engine refuses
    become error rows of stage infer, one per prompt, and good clips in the batch still label."""
    from lavi.serving.engine import Engine

    size = Engine.load(tiny_model).image_size
    labeler = Labeler(LabelerSpec(tiny_model, "job", {"max_new_tokens": 2}, max_batch=8))
    good = np.zeros((1, size, size, 3), np.uint8)
    bad = np.zeros((1, 3, 3, 3), np.uint8)

    def clip(name, frames, status="ok"):
        return {"item_id": name, "uri": f"/{name}.png", "media_type": "image",
                "prompts": [{"task": "vqa", "prompt": Q}, {"task": "vqa", "prompt": "is it red?"}],
                "clip_index": None, "clip_start_s": None, "clip_end_s": None, "frame_timestamps_s": None,
                "width": 4, "height": 4, "frames": frames.tobytes(), "frame_shape": list(frames.shape),
                "status": status, "error_stage": "decode" if status == "error" else None,
                "error": "boom" if status == "error" else None, ITEM_ROWS: 2}

    labeler.max_batch = 2  # one sub-batch per clip: the bad clip's failure stays its own
    out = labeler(pa.Table.from_pylist([clip("a", good), clip("b", bad), clip("c", good[:0], "error")],
                                       schema=CLIP_SCHEMA))
    rows = out.to_pylist()
    labelled = {"ok", "truncated"}
    assert [(r["item_id"], "labelled" if r["status"] in labelled else r["status"], r["error_stage"]) for r in rows] == [
        ("a", "labelled", None), ("a", "labelled", None),
        ("b", "error", "infer"), ("b", "error", "infer"), ("c", "error", "decode"), ("c", "error", "decode")]
    assert {rows[0]["status"], rows[1]["status"]} <= labelled and "ValueError" in rows[2]["error"]
    assert rows[0]["text"] is not None and rows[2]["text"] is None and rows[4]["error"] == "boom"


def test_labeler_refuses_to_return_rows_it_never_labelled(tiny_model):
    """Guards against the labeler's every-row-once check being one that cannot fail: a request that is never
    asked (here: inference skipped) must raise, not leave rows without a status."""
    from lavi.serving.engine import Engine

    engine = Engine.load(tiny_model)
    labeler = Labeler.from_engine(engine, "job", {"max_new_tokens": 2})
    frames = np.zeros((1, engine.image_size, engine.image_size, 3), np.uint8)
    clip = {"item_id": "a", "uri": "/a.png", "media_type": "image", "prompts": [{"task": "caption", "prompt": None}],
            "clip_index": None, "clip_start_s": None, "clip_end_s": None, "frame_timestamps_s": None,
            "width": 4, "height": 4, "frames": frames.tobytes(), "frame_shape": list(frames.shape),
            "status": "ok", "error_stage": None, "error": None, ITEM_ROWS: 1}
    batch = pa.Table.from_pylist([clip], schema=CLIP_SCHEMA)
    row = labeler(batch).to_pylist()[0]
    assert row["status"] in ("ok", "truncated") and row["prompt"] == engine.default_prompt("image")
    labeler._infer = lambda *args, **kwargs: None
    with pytest.raises(AssertionError, match="without a status"):
        labeler(batch)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.run", *args]


def test_killed_run_resumes_without_duplicates(ray_local, tiny_model, tmp_path):
    """Guards against a SIGKILLed run leaving a half-written file that is counted, losing items, or
    writing some rows twice when rerun; and a finished job's rerun adding rows."""
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), 24, 0, seed=3)
    out = tmp_path / "out"
    args = _cli(str(corpus), "--out", str(out), "--model", tiny_model, "--batch-size", "1", "--rows-per-file", "1",
                "--max-new-tokens", "8", "--address", ray_local)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while len(list(out.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = pq.read_table(out).num_rows
    assert not (out / "_summary.json").exists(), "the run finished before it was killed: the test proved nothing"
    assert 3 <= written < 24
    (out / "_summary.json").write_text("{}")  # a stale marker from an earlier run must not survive a rerun
    killed = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    while (out / "_summary.json").exists() and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (out / "_summary.json").exists()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(out)
    assert table.num_rows == 24 and len(set(table.column("item_id").to_pylist())) == 24
    summary = Output(str(out)).read_summary()
    assert summary["this_run"]["items_skipped"] >= 3 and summary["this_run"]["rows"] == 24 - summary["this_run"]["items_skipped"]
    assert "24 rows for 24 items" in done.stdout


def test_unschedulable_pool_and_bad_frames_are_refused(ray_local, tiny_model, tmp_path):
    """Guards against an actor pool taking every CPU (Ray Data then waits forever with no error) and
    --frames beyond the model's temporal embedding failing every row at inference."""
    write_corpus(str(tmp_path / "corpus"), 1, 0, seed=5)
    base = RunConfig(inputs=(str(tmp_path / "corpus"),), out=str(tmp_path / "out"), model=tiny_model)
    with pytest.raises(ValueError, match="lower --workers"):
        run(RunConfig(**{**base.__dict__, "workers": 4}))
    with pytest.raises(ValueError, match="max_frames"):
        run(RunConfig(**{**base.__dict__, "frames": 10_000}))


@pytest.mark.timeout(600)  # three pipelines, one rebuilt: minutes on a loaded 2-core machine
def test_a_lost_actor_rebuilds_the_pipeline_over_the_items_left(ray_local, tiny_model, tmp_path, monkeypatch):
    """Guards against a lost node, actor or object ending the job although its committed items are safe, and
    against the rebuilt pipeline redoing finished items: a part file whose commit record never reached the driver
    (the graph died first) is found in its shard's files and not labelled again; anything else must still fail."""
    import ray.exceptions

    import pipeline.graph as graph

    write_corpus(str(tmp_path / "corpus"), 10, 0, seed=3)
    real, calls = graph.build_dataset, []

    class Dying:
        """The first graph: yields two batches of commit records, the second without its first record (the file
        is written, its record lost), then its labeler actor dies (after its last batch, if the second is)."""

        def __init__(self, ds, error):
            self.ds, self.error = ds, error

        def iter_batches(self, **kwargs):
            for i, batch in enumerate(self.ds.iter_batches(**kwargs)):
                if i == 1:
                    yield batch.slice(1)
                    raise self.error
                yield batch
            raise AssertionError("the graph gave one batch of records: the test needs two")

    def build(spec):
        calls.append(spec)
        ds = real(spec)
        return Dying(ds, ray.exceptions.ActorDiedError()) if len(calls) == 1 else ds

    monkeypatch.setattr(graph, "build_dataset", build)
    out = tmp_path / "out"
    config = RunConfig(inputs=(str(tmp_path / "corpus"),), out=str(out), model=tiny_model, max_new_tokens=2,
                       batch_size=2, decode_batch_size=2, rows_per_file=2, task="vqa", questions=(Q, "what is it?"))
    summary = run(config)
    rows = pq.read_table(out).to_pylist()
    assert len(summary["pipeline_rebuilds"]) == 1  # a second graph only if the first had not committed everything
    rebuild = summary["pipeline_rebuilds"][0]
    assert "ActorDiedError" in rebuild["error"] and len(calls) == (1 if rebuild["items_left"] == 0 else 2)
    assert sorted(r["row_id"] for r in rows) == sorted(set(r["row_id"] for r in rows)) and len(rows) == 20
    assert rebuild["items_done"] >= 2 and rebuild["items_left"] == 10 - rebuild["items_done"]
    assert summary["rows"] == 20 and summary["this_run"]["rows"] == 20 and summary["items"] == 10

    calls.clear()
    monkeypatch.setattr(graph, "build_dataset", lambda spec: Dying(real(spec), ValueError("a real bug")))
    with pytest.raises(ValueError, match="a real bug"):
        run(RunConfig(**{**config.__dict__, "out": str(tmp_path / "out2")}))


def test_a_stalled_pipeline_says_what_it_waits_on_then_fails(ray_local, tiny_model, tmp_path, monkeypatch, caplog):
    """Guards against a job that hangs with no row and no message (a rebuild that no node can schedule): the driver
    warns after one stall period with what the cluster has, and fails after a second with that message."""
    import threading

    import pipeline.graph as graph
    from pipeline.recovery import PipelineStalled

    class Stuck:
        def iter_batches(self, **kwargs):
            threading.Event().wait()  # never a batch, as when no node can take the pending tasks
            yield

    monkeypatch.setattr(graph, "build_dataset", lambda spec: Stuck())
    write_corpus(str(tmp_path / "corpus"), 2, 0, seed=4)
    t0 = time.monotonic()
    with pytest.raises(PipelineStalled, match=r"no rows for 3 s: the pipeline is stalled \(cluster \{CPU: 2"):
        run(RunConfig(inputs=(str(tmp_path / "corpus"),), out=str(tmp_path / "out"), model=tiny_model,
                      stall_timeout=1.5))
    assert time.monotonic() - t0 < 60
    assert "the pipeline may be stalled" in caplog.text


@pytest.mark.timeout(600)
def test_labelling_starts_while_the_inputs_are_still_listed(ray_local, tiny_model, tmp_path, monkeypatch):
    """Guards against a listing that must end before any item is labelled (a 100M-item prefix listed for half an
    hour before a GPU works): the listing is held after its first shards until a part file is committed, which
    only a pipeline that labels while it lists can do; the run then ends with every row once. The reader's own block
    size (pipeline.graph._plan_rules) is made small here, so that a few shards make a block (a run's is 1 MiB of
    items; the other operators' 128 MiB would hold them all), and the split batch and labeler blocks fewer items than
    the held listing has."""
    import glob
    import threading

    import pipeline.listing
    import workers.settings

    write_corpus(str(tmp_path / "corpus"), 30, 0, seed=6)
    out = tmp_path / "out"
    monkeypatch.setattr(workers.settings, "READER_BLOCK_BYTES", 2048)
    monkeypatch.setattr(pipeline.listing, "SHARD_SIZE", 5)
    committed = threading.Event()
    real = pipeline.listing.iter_items

    def held(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 20:  # four shards listed: hold the rest until the pipeline has committed some
                for _ in range(1200):
                    if glob.glob(str(out / "part-*.parquet")):
                        committed.set()
                        break
                    time.sleep(0.1)
            yield item

    monkeypatch.setattr(pipeline.listing, "iter_items", held)
    summary = run(RunConfig(inputs=(str(tmp_path / "corpus" / "images"),), out=str(out), model=tiny_model,
                            max_new_tokens=2, batch_size=2, decode_batch_size=2, task="vqa",
                            questions=(Q, "what is it?")))
    assert committed.is_set(), "nothing was committed while the listing was held"
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len({r["row_id"] for r in rows}) == 60 == summary["rows"] and summary["items"] == 30


def test_ray_data_operators_keep_a_bounded_number_of_block_stats(ray_local, monkeypatch):
    """Ray Data's map operators keep a BlockStats of every block they pass on, for the life of the run: a driver whose
    memory grew with the corpus (seen in a 400k-item run: BlockStats, BlockExecStats and TaskExecWorkerStats, 4,900
    each and growing; flat with the rule). With the pipeline's plan rules (pipeline.graph._plan_rules) each operator
    keeps its last STATS_BLOCKS: looked at here on the operators of a many-block dataset streamed through two maps."""
    import ray.data

    import pipeline.graph

    monkeypatch.setattr(pipeline.graph, "STATS_BLOCKS", 8)
    seen, every = [], pipeline.graph._operators
    monkeypatch.setattr(pipeline.graph, "_operators", lambda dag: seen.extend(every(dag)) or every(dag))
    pipeline.graph._plan_rules()
    ds = ray.data.range(600, override_num_blocks=300).map_batches(lambda b: b, batch_size=None)
    ds = ds.map_batches(lambda b: b, batch_size=None, num_cpus=0.5)  # a second operator (not fused: its own CPUs)
    blocks = sum(1 for _ in ds.iter_batches(batch_size=None))
    kept = [op._output_blocks_stats for op in seen if hasattr(op, "_output_blocks_stats")]
    ran = [k for k in kept if len(k)]  # (the operators before fusion never run)
    assert blocks >= 250 and len(ran) >= 2
    assert all(len(k) == 8 for k in ran), [len(k) for k in ran]  # full, and no longer
