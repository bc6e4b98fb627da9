"""DecodeSettings: how the CPU stages read, split and decode, validated once, frozen (pipeline.graph makes one)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lavi.resolution import DynamicResolution

FIXED, SHOTS = "fixed", "shots"  # --clips: fixed-length clips, or clips cut at shot changes (workers.shots)
CLIP_MODES = (FIXED, SHOTS)
# Files read whole into memory (images; a video the probe cannot open, for the whole-file decoders to recover what
# they can) are refused above this; videos that probe stream by range reads and have no size limit but the user's.
WHOLE_FILE_BYTES = 1 << 30
# --clips shots numbers window w's clips from w * SHOT_STRIDE (its clips are found in its own decode task, so their
# count is not known when the video is split): clip_index orders a video's clips but has gaps between windows
SHOT_STRIDE = 10_000
# Ray Data's target block size, as the pipeline sets it (pipeline.graph): a task's output leaves it a block at a time,
# a block when its rows pass about this size or the task ends. A clip group's frames are kept under it
# (`group_clips`), so that a group leaves its decode task in one block and reaches one labeler block whole (a unit cut
# between blocks is committed by the driver instead).
BLOCK_BYTES = 128 << 20
# The listing reader's own block size (pipeline.graph sets it on that operator alone): its items leave it this many
# bytes at a time (about 4,000 items), so the items in flight, and the driver's bookkeeping of their blocks, stay a
# few shards whatever the corpus; every other operator keeps BLOCK_BYTES.
READER_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class DecodeSettings:
    image_size: int  # the model's square input side S
    frames_per_clip: int = 8
    clip_seconds: float = 0.0  # --clips fixed: 0, the whole video is one clip
    max_clips: int | None = None  # --clips fixed: keep the first N clips of a video
    clips: str = FIXED  # how a video is cut into clips: FIXED (clip_seconds) or SHOTS
    min_clip_seconds: float = 2.0  # --clips shots: shorter shots merge into a neighbour
    max_clip_seconds: float = 10.0  # --clips shots: longer shots are split into equal parts
    # Clips per clip group: a group is one decode task (one isolated call, with timeout_s) and one commit unit,
    # so a task holds at most this many clips' frames. --clips shots: a window of clips_per_group *
    # max_clip_seconds seconds is one task and unit, decoded this many clips per isolated call.
    clips_per_group: int = 16
    # Pixel limit checked on the header before decoding: 2**26 (~67 MP) admits 64 MP phone
    # photos (9248x6936) and 8K frames; one such image is ~200 MB as RGB.
    max_pixels: int = 2**26
    max_bytes: int | None = None  # the user's per-item limit: bigger files are refused (a read error row)
    timeout_s: float = 60.0  # per isolated call: a whole item, a probe, a clip group or a window's shot detection
    retries: int = 3  # read retries on transient errors
    storage_options: dict = field(default_factory=dict)  # fsspec options (credentials stay out of rows)
    isolate: bool = True  # False: decode in this process (debugging; no timeout or crash guard)
    # The model's input contract for images: None, one image_size square; LLaVA-OneVision's anyres grid
    # resolutions (height, width): the base view and the grid's image_size tiles (workers.anyres.anyres_tiles). A tile
    # count is bounded by the largest pinpoint, so an item's memory stays bounded too.
    pinpoints: tuple[tuple[int, int], ...] | None = None
    # A dynamic-resolution model's contract (lavi.resolution): each image at its own size (1, h, w, 3), a video's
    # frames all at one size per clip (F, h, w, 3), both within the contract's pixel bounds (its max_pixels bounds an
    # item's memory); image_size and pinpoints are then not used for frames (workers.dynamic). None: square frames.
    dynamic: DynamicResolution | None = None

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")
        if self.clip_seconds < 0:
            raise ValueError(f"clip_seconds must be >= 0 (0 = one clip per video), got {self.clip_seconds}")
        if self.max_clips is not None and self.max_clips < 1:
            raise ValueError(f"max_clips must be None or >= 1, got {self.max_clips}")
        if self.max_pixels < 1 or self.timeout_s <= 0 or self.retries < 0:
            raise ValueError("max_pixels must be >= 1, timeout_s > 0 and retries >= 0")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be None or >= 1, got {self.max_bytes}")
        if self.clips not in CLIP_MODES:
            raise ValueError(f"clips must be one of {CLIP_MODES}, got {self.clips!r}")
        if self.clips_per_group < 1:
            raise ValueError(f"clips_per_group must be >= 1, got {self.clips_per_group}")
        if not 0 < self.min_clip_seconds <= self.max_clip_seconds:
            raise ValueError(f"need 0 < min_clip_seconds <= max_clip_seconds, got {self.min_clip_seconds} and "
                             f"{self.max_clip_seconds}")
        if self.dynamic is not None and self.pinpoints is not None:
            raise ValueError("a model's input is anyres tiles (pinpoints) or dynamic resolution, not both")
        video = self.dynamic.video if self.dynamic is not None else None
        if video is not None and video.per_clip and self.frames_per_clip < video.temporal_factor:
            raise ValueError(f"this model takes a video clip's frames {video.temporal_factor} at a time: "
                             f"--frames must be at least {video.temporal_factor}, got {self.frames_per_clip}")
        if self.clips == SHOTS and self.max_shot_clips >= SHOT_STRIDE:
            raise ValueError(f"a shots window ({self.shot_window_s:g} s) could hold {self.max_shot_clips} clips of "
                             f"--min-clip-seconds {self.min_clip_seconds:g}; at most {SHOT_STRIDE - 1}: raise "
                             "--min-clip-seconds or lower --max-clip-seconds")

    @property
    def group_clips(self) -> int:
        """Clips per clip group (--clips fixed): clips_per_group, fewer when that many clips' frames at the model's
        input would pass BLOCK_BYTES (32 frames of 384 px: 9; dynamic resolution: a clip at its most pixels)."""
        pixels = (self.dynamic.video.max_clip_pixels(self.frames_per_clip) if self.dynamic is not None
                  else self.frames_per_clip * self.image_size * self.image_size)
        clip_bytes = pixels * 3
        return max(1, min(self.clips_per_group, BLOCK_BYTES // clip_bytes))

    @property
    def shot_window_s(self) -> float:
        """--clips shots: the length of one window (one decode task and commit unit)."""
        return self.clips_per_group * self.max_clip_seconds

    @property
    def max_shot_clips(self) -> int:
        """The most clips one window can give (its last may be 1.25 windows long: workers.video.MERGE_TAIL; the
        pieces at its two edges may be shorter than min_clip_seconds: workers.shots.shot_clips)."""
        return int(1.25 * self.shot_window_s / self.min_clip_seconds) + 3

    @property
    def whole_file_bytes(self) -> int:
        """The limit on a file read whole: the user's, and never over WHOLE_FILE_BYTES."""
        return min(self.max_bytes or WHOLE_FILE_BYTES, WHOLE_FILE_BYTES)
