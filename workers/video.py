"""Video bytes -> clips of uniformly sampled frames at the model's input size.

decord first (seeks to the sampled frames only); PyAV as the fallback, which also
recovers the frames before the break in a truncated file. Only the sampled frames are
ever converted to arrays, one clip at a time, so memory stays at about F native frames.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np

from workers.frames import Clip, DecodedVideo, DecodeError, Fit, clean_message, rgb_array_to_model_input

log = logging.getLogger(__name__)

# A trailing piece shorter than this fraction of clip_seconds joins the previous clip
# (a 8.03 s video at 4 s clips gives two clips, not a third of one frame).
MERGE_TAIL = 0.25


def plan_clips(duration_s: float, clip_seconds: float, max_clips: int | None) -> list[tuple[float, float]]:
    """[(start_s, end_s), ...] covering [0, duration]; clip_seconds == 0 means one clip."""
    if clip_seconds <= 0 or duration_s <= clip_seconds:
        return [(0.0, duration_s)]
    n = max(1, math.ceil(duration_s / clip_seconds - MERGE_TAIL))
    bounds = [(k * clip_seconds, (k + 1) * clip_seconds) for k in range(n)]
    bounds[-1] = (bounds[-1][0], duration_s)
    return bounds[:max_clips] if max_clips else bounds


def sample_times(start_s: float, end_s: float, frames: int) -> np.ndarray:
    """Centres of `frames` equal segments of [start, end)."""
    return start_s + (np.arange(frames) + 0.5) * (end_s - start_s) / frames


def frame_for(starts: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time t: the last frame starting at or before t."""
    return np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(starts) - 1)


def decode_video(
    data: bytes, fit: Fit, frames_per_clip: int, clip_seconds: float, max_clips: int | None,
    max_pixels: int | None = None,
) -> DecodedVideo:
    """Video bytes -> DecodedVideo; each clip has frames (F, S, S, 3) uint8 RGB, S = fit (a square side), or what
    a callable `fit` makes of them (a dynamic-resolution model's: (F, h, w, 3), workers.dynamic.ClipFit).

    Times are seconds from the first frame. A frame size over `max_pixels` (read from the
    stream header) is refused before decoding. Raises DecodeError with a row-ready message.
    """
    if not data:
        raise DecodeError("empty file")
    if max_pixels is not None:
        size = _probe_size(data)
        if size and size[0] * size[1] > max_pixels:
            raise DecodeError(f"video too large: {size[0]}x{size[1]} frames, over the limit of {max_pixels} pixels")
    args = (fit, frames_per_clip, clip_seconds, max_clips)
    try:
        return _decode_decord(data, *args)
    except ImportError:  # e.g. no decord wheel for this platform
        note = "decord is not installed; used PyAV"
    except (_decord_error(), RuntimeError, ValueError, OSError) as err:
        note = f"decord failed ({clean_message(str(err))}); used PyAV"
    video = _decode_pyav(data, *args)
    log.debug(note)
    return DecodedVideo(video.clips, video.width, video.height, video.duration_s, video.decoder, note)


def _av():
    import av

    av.logging.set_level(av.logging.PANIC)  # ffmpeg's own stderr chatter; errors come as exceptions
    return av


def _probe_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the first video stream from the header, or None if unreadable."""
    av = _av()
    try:
        with av.open(io.BytesIO(data)) as container:
            if container.streams.video:
                ctx = container.streams.video[0].codec_context
                return ctx.width, ctx.height
    except av.error.FFmpegError:
        pass  # the decoders below report why
    return None


def _decord_error() -> type:
    from decord._ffi.base import DECORDError  # not a RuntimeError subclass

    return DECORDError


def _clips(starts: np.ndarray, duration: float, read, fit: Fit, frames_per_clip: int,
           clip_seconds: float, max_clips: int | None) -> list[Clip]:
    """Build clips; read(indices) -> list of (H, W, 3) uint8 frames for those frame indices."""
    clips = []
    for k, (a, b) in enumerate(plan_clips(duration, clip_seconds, max_clips)):
        idx = frame_for(starts, sample_times(a, b, frames_per_clip))
        frames = np.stack([rgb_array_to_model_input(f, fit) for f in read(idx)])  # (F, S, S, 3) or (F, h, w, 3)
        clips.append(Clip(k, float(a), float(b), [float(starts[i]) for i in idx], frames))
    return clips


def _decode_decord(data: bytes, fit: Fit, frames_per_clip: int, clip_seconds: float,
                   max_clips: int | None) -> DecodedVideo:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    if n == 0:
        raise ValueError("no video frames")
    times = vr.get_frame_timestamp(np.arange(n))  # (n, 2): start, end in seconds
    t0 = float(times[0, 0])
    starts, duration = times[:, 0] - t0, float(times[-1, 1]) - t0
    shape = []

    def read(idx: np.ndarray) -> list[np.ndarray]:
        batch = vr.get_batch(list(idx)).asnumpy()  # (F, H, W, 3) at native size
        shape[:] = batch.shape[1:3]
        return list(batch)

    clips = _clips(starts, duration, read, fit, frames_per_clip, clip_seconds, max_clips)
    return DecodedVideo(clips, int(shape[1]), int(shape[0]), duration, "decord")


def _decode_pyav(data: bytes, fit: Fit, frames_per_clip: int, clip_seconds: float,
                 max_clips: int | None) -> DecodedVideo:
    av = _av()
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            # pass 1: demux only (no decoding) for the timestamps of the frames present
            pts, ends = [], []
            for packet in _packets(container, stream):
                if packet.pts is not None:
                    t = float(packet.pts * packet.time_base)
                    pts.append(t)
                    ends.append(t + float((packet.duration or 0) * packet.time_base))
    except av.error.FFmpegError as err:
        raise DecodeError(f"not a video: {clean_message(str(err))}") from err
    if not pts:
        raise DecodeError("no video frames")
    starts = np.sort(np.asarray(pts))
    t0 = float(starts[0])
    starts, duration = starts - t0, max(ends) - t0
    plan = [(a, b, frame_for(starts, sample_times(a, b, frames_per_clip)))
            for a, b in plan_clips(duration, clip_seconds, max_clips)]
    wanted = sorted({float(starts[i]) for _, _, idx in plan for i in idx})
    got, size = _decode_wanted(data, wanted, t0, fit)
    if not got:
        raise DecodeError("no decodable video frames")
    clips = []
    for k, (a, b, idx) in enumerate(plan):
        picked = [got[float(starts[i])] for i in idx]
        frames = np.stack([f for f, _ in picked])  # (F, S, S, 3)
        clips.append(Clip(k, float(a), float(b), [t for _, t in picked], frames))
    return DecodedVideo(clips, size[0], size[1], duration, "pyav")


def _packets(container, stream):
    """Demuxed packets until the end or the first break in the file (truncation)."""
    av = _av()
    try:
        yield from container.demux(stream)
    except av.error.FFmpegError as err:
        log.debug("demux stopped: %s", clean_message(str(err)))


def _frames(container, stream):
    """Decoded frames in presentation order; broken packets (a truncated tail) are skipped
    and the decoder is flushed at the end, so the frames it still holds come out too."""
    av = _av()
    for packet in _packets(container, stream):
        try:
            yield from packet.decode()
        except av.error.FFmpegError:
            continue
    try:
        yield from stream.codec_context.decode(None)  # flush (a no-op after demux's own flush packet)
    except av.error.FFmpegError:
        pass


def _decode_wanted(data: bytes, wanted: list[float], t0: float, fit: Fit):
    """Decode once through the stream; keep only the wanted frames, resized, as
    {wanted time: (frame, its actual time)}. A wanted frame that does not decode is replaced
    by the last frame that did (or the next, at the start), with that frame's time."""
    got: dict[float, tuple[np.ndarray, float]] = {}
    size = (0, 0)
    j, prev, prev_t = 0, None, 0.0  # next wanted time; last decoded frame (not converted), its time
    with _av().open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for frame in _frames(container, stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * frame.time_base) - t0
            size = (frame.width, frame.height)
            while j < len(wanted) and wanted[j] < t - 1e-6:  # that frame never decoded
                got[wanted[j]] = (_to_input(frame, fit), t) if prev is None else (
                    _to_input(prev, fit), prev_t)
                j += 1
            if j < len(wanted) and abs(wanted[j] - t) <= 1e-6:
                got[wanted[j]] = (_to_input(frame, fit), t)
                j += 1
            prev, prev_t = frame, t
            if j == len(wanted):
                break  # every sampled frame is in: stop decoding
    for w in wanted[j:]:
        if prev is not None:
            got[w] = (_to_input(prev, fit), prev_t)
    return got, size


def _to_input(frame, fit: Fit) -> np.ndarray:
    return rgb_array_to_model_input(frame.to_ndarray(format="rgb24"), fit)
