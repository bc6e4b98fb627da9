"""The CPU stage: fetch with retries, image/video decode, isolation. Every item yields rows."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import media
import numpy as np
import pytest

from schemas.clips import DECODED_KEYS
from schemas.manifest import make_item
from workers.decode import DecodeSettings, decode_item, fetch_and_decode, sniff_media_type
from workers.fetch import FetchError, fetch_bytes
from workers.isolate import IsolatedRunner, IsolationError
from workers.video import _decode_decord, _decode_pyav, decode_video, plan_clips

S = 32
SETTINGS = DecodeSettings(image_size=S, isolate=False)
PROMPTS = [{"task": "caption", "prompt": "describe the image."}]


def item(uri: str) -> dict:
    return make_item(uri, PROMPTS)


def one_error(rows: list[dict], stage: str, message: str) -> dict:
    assert len(rows) == 1, rows
    row = rows[0]
    assert set(row) == set(DECODED_KEYS)
    assert (row["status"], row["error_stage"]) == ("error", stage), row["error"]
    assert message in row["error"], row["error"]
    assert row["frames"].shape == (0, S, S, 3) and row["frames"].dtype == np.uint8
    return row


@pytest.fixture(scope="module")
def video10(tmp_path_factory) -> bytes:
    """10 s, 8 fps, 64x64; frame i has grey level 2*i (+- noise)."""
    return media.mp4(tmp_path_factory.mktemp("v") / "ten.mp4", seconds=10, fps=8)


def level_at(t: float, fps: int = 8) -> float:
    return 2 * round(t * fps)


# images


@pytest.mark.parametrize("name", sorted(media.unusual_images()))
def test_unusual_valid_images_decode(name):
    """Guards against valid but awkward images (16-bit, CMYK, 1-bit, palette, alpha, animated,
    EXIF-rotated, 1x1, 4000x3) becoming errors or reporting the wrong size."""
    data, (width, height) = media.unusual_images()[name]
    rows = decode_item(item(f"s3://b/{name}"), SETTINGS, data)
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows[0]["error"]
    row = rows[0]
    assert (row["media_type"], row["width"], row["height"], row["clip_index"]) == ("image", width, height, None)
    assert row["frames"].shape == (1, S, S, 3) and row["frames"].dtype == np.uint8


def test_exif_rotation_turns_the_pixels_too():
    """Guards against swapping width/height in the metadata but feeding the model the sideways image."""
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 40:] = 255  # stored: dark left half, bright right half
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # upright = stored rotated 90 degrees clockwise: the right half goes to the bottom
    data = media.image_bytes(Image.fromarray(pixels), "JPEG", exif=exif.tobytes())
    frame = decode_item(item("r.jpg"), SETTINGS, data)[0]["frames"][0]
    assert frame[: S // 2 - 2].mean() < 30 and frame[S // 2 + 2:].mean() > 225


def test_alpha_over_white_and_16_bit_scaling():
    """Guards against transparent pixels turning black and 16-bit grey saturating to white."""
    from PIL import Image

    clear = media.image_bytes(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")
    assert decode_item(item("a.png"), SETTINGS, clear)[0]["frames"].min() == 255
    mid = media.image_bytes(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG")
    assert abs(int(decode_item(item("g.png"), SETTINGS, mid)[0]["frames"].mean()) - 128) <= 1


@pytest.mark.parametrize("name", sorted(media.bad_images()))
def test_bad_images_give_one_readable_error_row(name):
    """Guards against corrupt/hostile images crashing the worker, exhausting memory or
    producing rows without a clear message."""
    data, message = media.bad_images()[name]
    one_error(decode_item(item(f"s3://b/{name}"), SETTINGS, data), "decode", message)


def test_pixel_limit_is_checked_before_decoding(video10):
    """Guards against the limit being applied after load() (a bomb would already be in memory),
    and against videos escaping it."""
    settings = DecodeSettings(image_size=S, max_pixels=1000, isolate=False)
    one_error(decode_item(item("p.png"), settings, media.png(64, 48)), "decode",
              "64x48 = 3072 pixels, over the limit of 1000")
    one_error(decode_item(item("v.mp4"), settings, video10), "decode", "64x64 frames, over the limit of 1000")


# video


def test_clip_math_for_a_long_video(video10):
    """Guards against clips that overlap, miss the tail, or sample frames outside their clip."""
    video = decode_video(video10, S, 8, 4.0, None)
    assert video.decoder == "decord" and (video.width, video.height) == (64, 64)
    assert [(c.start_s, c.end_s) for c in video.clips] == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    for clip in video.clips:
        assert clip.frames.shape == (8, S, S, 3)
        assert all(clip.start_s <= t < clip.end_s for t in clip.timestamps_s)
        assert clip.timestamps_s == sorted(clip.timestamps_s)
        for t, frame in zip(clip.timestamps_s, clip.frames):  # the pixels are the frame at t
            assert abs(frame.mean() - level_at(t)) < 4, (t, frame.mean())
    assert video.clips[0].timestamps_s == [0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75]
    assert len(decode_video(video10, S, 8, 4.0, 2).clips) == 2
    whole = decode_video(video10, S, 4, 0.0, None).clips
    assert len(whole) == 1 and (whole[0].start_s, whole[0].end_s) == (0.0, 10.0)


def test_plan_clips_merges_a_sliver_tail():
    """Guards against a last clip of one frame repeated F times (8.03 s at 4 s clips)."""
    assert plan_clips(8.03, 4.0, None) == [(0.0, 4.0), (4.0, 8.03)]
    assert plan_clips(10.0, 4.0, None) == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    assert plan_clips(3.0, 4.0, None) == [(0.0, 3.0)]


def test_pyav_fallback_matches_decord(video10):
    """Guards against the fallback sampling different frames or times than the primary decoder."""
    a, b = _decode_decord(video10, S, 8, 4.0, None), _decode_pyav(video10, S, 8, 4.0, None)
    assert [c.timestamps_s for c in a.clips] == [c.timestamps_s for c in b.clips]
    for ca, cb in zip(a.clips, b.clips):
        assert np.abs(ca.frames.astype(int) - cb.frames.astype(int)).max() <= 2


def test_truncated_mp4_recovers_frames_via_pyav(video10):
    """Guards against losing a whole video when only its tail is cut (decord refuses it whole)."""
    for fraction in (0.3, 0.6, 0.9):
        video = decode_video(video10[: int(len(video10) * fraction)], S, 16, 0.0, None)
        assert video.decoder == "pyav" and "decord failed" in video.note
        assert 10 * fraction - 1.5 < video.duration_s < 10.0
        for t, frame in zip(video.clips[0].timestamps_s, video.clips[0].frames):  # honest times
            assert abs(frame.mean() - level_at(t)) < 4, (fraction, t, frame.mean())


def test_bad_videos_give_one_readable_error_row(tmp_path, video10):
    """Guards against broken videos crashing the stage or leaking raw bytes into messages."""
    for name, (data, message) in media.bad_videos(tmp_path).items():
        row = one_error(decode_item(item(f"s3://b/{name}"), SETTINGS, data), "decode", message)
        assert "hello" not in row["error"] and row["error"].isprintable()


def test_content_wins_over_extension(video10):
    """Guards against trusting the name: an MP4 named .jpg is a video, a PNG named .mp4 an image."""
    assert sniff_media_type(video10) == "video" and sniff_media_type(media.png()) == "image"
    rows = decode_item(item("s3://b/actually_video.jpg"), SETTINGS, video10)
    assert [r["media_type"] for r in rows] == ["video"] and rows[0]["clip_index"] == 0
    assert rows[0]["status"] == "ok" and len(rows[0]["frame_timestamps_s"]) == 8
    rows = decode_item(item("s3://b/actually_image.mp4"), SETTINGS, media.png())
    assert rows[0]["media_type"] == "image" and rows[0]["status"] == "ok"


# fetch


class _Flaky(BaseHTTPRequestHandler):
    """GET /fail-N/name answers 503 to the first N requests, then 200; /missing 404; /secret 403."""

    hits: dict[str, int] = {}

    def do_GET(self):
        n = _Flaky.hits[self.path] = _Flaky.hits.get(self.path, 0) + 1
        code = 200
        if self.path.startswith("/fail-"):
            code = 503 if n <= int(self.path.split("-")[1].split("/")[0]) else 200
        elif self.path.startswith("/missing"):
            code = 404
        elif self.path.startswith("/secret"):
            code = 403
        body = media.png() if code == 200 else b"no"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_retries_transient_errors_only(http_base):
    """Guards against giving up on a 503 blip, and against retrying a 404/403 (wasted time)."""
    assert fetch_bytes(f"{http_base}/fail-2/a.png", retries=3, backoff_s=0.01) == media.png()
    assert _Flaky.hits["/fail-2/a.png"] == 3
    with pytest.raises(FetchError, match="after 3 attempts") as err:
        fetch_bytes(f"{http_base}/fail-9/b.png", retries=2, backoff_s=0.01)
    assert err.value.transient and _Flaky.hits["/fail-9/b.png"] == 3
    for path, message in (("/missing/c.png", "not found"), ("/secret/d.png", "403")):
        with pytest.raises(FetchError, match=message):
            fetch_bytes(f"{http_base}{path}", retries=3, backoff_s=0.01)
        assert _Flaky.hits[path] == 1


def test_read_failures_become_read_error_rows(tmp_path):
    """Guards against missing, oversized or unreachable inputs raising instead of giving a row."""
    big = media.write(tmp_path / "big.png", media.png(64, 64))
    cases = [
        (str(tmp_path / "gone.png"), DecodeSettings(image_size=S, isolate=False), "not found"),
        (str(tmp_path), DecodeSettings(image_size=S, isolate=False), "directory"),
        (big, DecodeSettings(image_size=S, max_bytes=1000, isolate=False), "file too large"),
        ("nosuchproto://x/y.png", DecodeSettings(image_size=S, isolate=False), "nosuchproto"),
    ]
    for uri, settings, message in cases:
        one_error(fetch_and_decode(item(uri), settings), "read", message)


def test_names_with_spaces_and_non_ascii(tmp_path):
    """Guards against paths being mangled (percent-encoding, unicode) between listing and reading."""
    path = tmp_path / "a folder" / "ünï cødé 写真 #1.jpg"
    media.write(path, media.jpeg())
    for uri in (str(path), f"file://{path}"):
        rows = fetch_and_decode(item(uri), SETTINGS)
        assert rows[0]["status"] == "ok" and rows[0]["uri"] == uri and rows[0]["width"] == 64


def test_fetch_from_real_s3(s3_server):
    """Guards against storage_options not reaching the filesystem (the S3 credentials path)."""
    fs = s3_server.fs()
    fs.pipe(f"{s3_server.bucket}/decode/x.png", media.png())
    settings = DecodeSettings(image_size=S, storage_options=s3_server.storage_options, isolate=False)
    rows = fetch_and_decode(item(f"s3://{s3_server.bucket}/decode/x.png"), settings)
    assert rows[0]["status"] == "ok" and rows[0]["width"] == 64
    one_error(fetch_and_decode(item(f"s3://{s3_server.bucket}/decode/none.png"), settings), "read", "not found")


# isolation


def test_isolated_runner_survives_crash_and_hang():
    """Guards against one segfaulting or hanging decode taking down the worker or later items."""
    runner = IsolatedRunner()
    try:
        assert runner.call(media.echo, 1, "a", timeout_s=30) == (1, "a")
        with pytest.raises(IsolationError, match=r"decoder crashed \(signal 11"):
            runner.call(media.segfault, timeout_s=30)
        assert runner.call(media.echo, 2, timeout_s=30) == (2,)
        with pytest.raises(IsolationError, match="decoder timed out after 0.5 s"):
            runner.call(media.sleep_forever, timeout_s=0.5)
        assert runner.call(media.echo, 3, timeout_s=30) == (3,)
        with pytest.raises(ValueError, match="programmer error"):  # raised by fn: re-raised as is
            runner.call(media.raise_value_error, timeout_s=30)
        assert runner.call(media.echo, 4, timeout_s=30) == (4,)
        assert runner.starts == 3  # first start + one restart per crash/hang, none for an exception
    finally:
        runner.close()


def test_hang_and_crash_cost_one_item_each(tmp_path):
    """Guards against a bad item poisoning its neighbours: n items in -> n row-sets out, in order."""
    good = media.write(tmp_path / "good.png", media.png())
    hang = media.write(tmp_path / "HANG.png", media.png())
    crash = media.write(tmp_path / "CRASH.png", media.png())
    settings = DecodeSettings(image_size=S, timeout_s=2.0)
    results = [fetch_and_decode(item(uri), settings, decoder=media.hang_or_crash_by_name)
               for uri in (good, hang, good, crash, good)]
    assert [r[0]["status"] for r in results] == ["ok", "error", "ok", "error", "ok"]
    one_error(results[1], "decode", "decoder timed out after 2 s")
    one_error(results[3], "decode", "decoder crashed (signal 11")
    assert all(r[0]["frames"].shape == (1, S, S, 3) for r in results[::2])


def test_isolated_child_is_recycled_after_max_calls():
    """Guards against a leaky decoder library growing one child's memory without bound."""
    runner = IsolatedRunner(max_calls=2)
    try:
        assert [runner.call(media.echo, i, timeout_s=30) for i in range(5)] == [(0,), (1,), (2,), (3,), (4,)]
        assert runner.starts == 3
    finally:
        runner.close()


def test_decoder_messages_are_cleaned():
    """Guards against decord's messages putting raw input bytes and C++ source paths in rows."""
    from workers.frames import clean_message

    raw = ("[15:22:00] /github/workspace/src/video/video_reader.cc:83: ERROR opening: \x00\x9fhello\x01, "
           "Invalid data found when processing input")
    assert clean_message(raw) == "cannot open: Invalid data found when processing input"
    assert clean_message("[Errno 1094995529] Invalid data found when processing input: '<none>'") == \
        "Invalid data found when processing input"
    assert len(clean_message("x" * 1000)) == 200


def test_isolated_decode_equals_in_process(tmp_path, video10):
    """Guards against the process boundary changing rows (dtype, shapes, key set, order)."""
    for name, data in (("i.png", media.png()), ("v.mp4", video10)):
        uri = media.write(tmp_path / name, data)
        a = fetch_and_decode(item(uri), DecodeSettings(image_size=S, clip_seconds=4.0, isolate=False))
        b = fetch_and_decode(item(uri), DecodeSettings(image_size=S, clip_seconds=4.0))
        assert len(a) == len(b) >= 1
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys() and np.array_equal(ra.pop("frames"), rb.pop("frames"))
            assert ra == rb
