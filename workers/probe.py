"""What a video is, from its header: the probe that comes before a long video is split into clip groups.

`probe_uri` opens the input for small range reads (workers.stream), sniffs its first bytes, opens the container
with PyAV on the file object and decodes its first frame only: the container's header (an MP4's index, wherever
it is in the file) and the first frame's packets are what it reads, not the file. It runs in the isolated child
(workers.isolate): a hostile header may hang or crash a demuxer too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from schemas.rows import IMAGE, VIDEO
from workers.frames import DecodeError, clean_message, sniff_media_type
from workers.fetch import DEFAULT_RETRIES
from workers.stream import PROBE_FETCH, InputFile, open_input
from workers.video import _av, _packets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoProbe:
    """A probe's answer. kind: "video" (the fields below are set), "image" (the content is an image), or
    "broken" (`error` says why: the whole-file decoders may still recover what they can)."""

    kind: str
    size: int  # bytes of the file
    bytes_read: int  # bytes the probe fetched from storage
    duration_s: float = 0.0  # from the first frame's start to the end of the last frame
    t0: float = 0.0  # the first frame's presentation time, on the stream's clock (seconds)
    width: int = 0
    height: int = 0
    error: str | None = None
    read_retries: int = 0  # the probe's fetches retried after a transient error


def probe_uri(uri: str, storage_options: dict | None, max_pixels: int | None = None,
              retries: int = DEFAULT_RETRIES) -> VideoProbe:
    """Probe one input (see the module doc), each fetch retried `retries` times on transient errors. Raises
    FetchError when it cannot be read."""
    with open_input(uri, storage_options, PROBE_FETCH, retries) as f:
        try:
            found = probe_input(f, max_pixels)
        except DecodeError as err:
            f.raise_read_error()  # a read that failed under PyAV is a read error, not a broken file
            return VideoProbe("broken", f.size, f.bytes_read, error=str(err), read_retries=f.retried)
        f.raise_read_error()
        return VideoProbe(found.kind, f.size, f.bytes_read, found.duration_s, found.t0, found.width, found.height,
                          read_retries=f.retried)


def probe_input(f: InputFile, max_pixels: int | None = None) -> VideoProbe:
    """Probe an open input; raises DecodeError (row-ready) for what is not a decodable video.

    A frame size over `max_pixels` is refused from the header, before anything is decoded."""
    if f.size == 0:
        raise DecodeError("empty file")
    head = f.read(16)
    f.seek(0)
    if sniff_media_type(head) == IMAGE:
        return VideoProbe(IMAGE, f.size, 0)
    av = _av()
    try:
        with av.open(f) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if max_pixels is not None and ctx.width * ctx.height > max_pixels:
                raise DecodeError(f"video too large: {ctx.width}x{ctx.height} frames, over the limit of "
                                  f"{max_pixels} pixels")
            first = next((fr for fr in container.decode(stream) if fr.pts is not None), None)
            if first is None:
                raise DecodeError("no video frames")
            t0 = float(first.pts * first.time_base)
            end = _header_end(container, stream)
            if end is None:  # no duration in the header (a live WebM, a raw stream): demux to the end once
                log.info("no duration in the header: demuxing the file to find its end")
                container.seek(0)
                end = max((float((p.pts + (p.duration or 0)) * p.time_base) for p in _packets(container, stream)
                           if p.pts is not None), default=t0)
            return VideoProbe(VIDEO, f.size, 0, max(0.0, end - t0), t0, first.width, first.height)
    except av.error.FFmpegError as err:
        raise DecodeError(f"not a video: {clean_message(str(err))}") from err


def _header_end(container, stream) -> float | None:
    """The end of the video stream (seconds, on its clock) from the header: the stream's start and duration,
    else the container's; None when the header has neither."""
    if stream.duration and stream.time_base:
        start = stream.start_time if stream.start_time is not None else 0
        return float((start + stream.duration) * stream.time_base)
    if container.duration:
        start = container.start_time if container.start_time is not None else 0
        return (start + container.duration) / 1e6  # AV_TIME_BASE units
    return None
