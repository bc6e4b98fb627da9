"""RunConfig: everything one labeling run needs, validated once, frozen.

The CLI maps its flags onto this dataclass and holds no logic; `pipeline.driver.run`
takes one. Storage options are kept as the KEY=VALUE strings of the command line and
parsed by `pipeline.storage_options`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from lavi.resolution import DynamicResolution
from lavi.visual_tokens.methods import VisualCompress
from pipeline.storage_options import parse_storage_options
from schemas.constraint import Constraint, ConstraintError
from schemas.manifest import MANIFEST_EXTS
from schemas.rows import CAPTION, TASKS, VQA
from workers.fetch import DEFAULT_RETRIES
from workers.settings import CLIP_MODES, FIXED, SHOTS, DecodeSettings

# CPUs of each task of the CPU stages (pipeline.graph): fractions, so that what a node loss leaves (one 1-CPU node
# beside a 0.5-CPU labeler actor) can still schedule every stage; Ray Data's backpressure bounds how many run at once
READ_CPUS = 0.05  # the listing's reader: one long-lived task that mostly waits for the next shard
DECODE_CPUS = 0.25  # split and decode tasks
COMMIT_CPUS = 0.1  # commit tasks: a labeler block's part files
STAGE_CPUS = READ_CPUS + DECODE_CPUS + COMMIT_CPUS  # what the CPU stages need beside the labelers to go on
CPU_BATCH = 32  # generation rows per batch on CPU when --batch-size is auto
DTYPES = ("float32", "bfloat16", "float16")  # --dtype: what a labeler computes in (auto: workers.labeler decides)
# A labeler's input block (one labeler call, and one commit task's part file) holds several generation batches:
# every block costs Ray tasks and a part file, and an in-flight pool fills a batch's freed rows from the rest of
# its block (measured: 2,000 images, bundled model, 2 cores: 51.7 s in blocks of 32, 45.1 s in blocks of 128)
BLOCK_BATCHES = 4
GPU_AUTO_BLOCK = 256  # clips per block when --batch-size is auto on a GPU (the actor sizes its batch from memory)


def parse_choices(value: tuple[str, ...] | list[str] | str | None) -> tuple[str, ...]:
    """--choices "a,b,c" (or a JSON list, for choices with commas) -> the choices."""
    if not value:
        return ()
    if not isinstance(value, str):
        return tuple(value)
    if value.lstrip().startswith("["):
        try:
            return tuple(json.loads(value))
        except json.JSONDecodeError as err:
            raise ValueError(f"--choices {value!r:.80} starts as a JSON list but is not one: {err}") from None
    return tuple(c.strip() for c in value.split(",") if c.strip())


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One labeling run: inputs -> Parquet at `out`. See `lavi-label run --help` for each field."""

    inputs: tuple[str, ...]
    out: str
    task: str = CAPTION
    prompt: str | None = None
    questions: tuple[str, ...] = ()
    # the run's prompts answer with one of these (a manifest question may have its own); a string: as --choices
    # takes them, "a,b,c" or a JSON list
    choices: tuple[str, ...] | str | None = ()
    json_schema: str | None = None  # or with JSON valid under this schema (its JSON text)
    model: str | None = None  # None: the bundled model (lavi.bundled.DEFAULT_MODEL)
    batch_size: int | None = None  # None ("auto"): from GPU memory on a GPU, CPU_BATCH on CPU
    compile: bool | None = None  # compiled decode step; None: on a GPU, not on CPU
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5  # CPU actors take a fraction so read/decode tasks always fit
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    frames: int | None = None  # None: the model's default
    clip_seconds: float | None = None  # None: the decoder's default
    max_clips: int | None = None  # None: the decoder's default
    clips: str = FIXED  # videos cut in fixed-length clips (clip_seconds) or at shot changes (workers.shots)
    min_clip_seconds: float | None = None  # --clips shots; None: the decoder's default
    max_clip_seconds: float | None = None  # --clips shots; None: the decoder's default
    clips_per_group: int = DecodeSettings.clips_per_group  # clips per decode task and commit unit
    decode_workers: int | None = None  # at most this many decode tasks at once; None: as the cluster allows
    max_bytes: int | None = None  # refuse inputs over this many bytes (a read error row); None: no limit
    storage_options: tuple[str, ...] = ()  # KEY=VALUE, as given on the command line
    address: str | None = None  # None: start a local Ray bound to 127.0.0.1
    overwrite: bool = False
    max_error_rate: float = 1.0
    job_id: str | None = None  # None: reuse the output's job id, else a fresh one
    rows_per_file: int = 5000
    inflight: bool = True  # in-flight batching in the labeler (False: static batches)
    quantize: str | None = None  # "int8": weight-only int8 decoder linear layers in the labelers (lavi.serving.quant)
    dtype: str | None = None  # the labelers' compute dtype (DTYPES); None: bf16 on a GPU, lavi.serving.cpu_pack.cpu_dtype on CPU
    visual_compress: str | None = None  # concat models: dct:KEEP or fastv:KEEP@LAYER (lavi.visual_tokens.methods)
    stall_timeout: float = 300.0  # s with no row: warn (what the cluster has, what waits); twice that: fail. 0: off
    fetch_retries: int = DEFAULT_RETRIES  # retries of a read on transient errors (backoff, RETRY_BUDGET_S at most)
    max_rebuilds: int = 3  # times the Ray Data graph is rebuilt over what is left after a lost node, actor or object
    verbose: bool = False  # Ray Data's own log lines on the terminal too (they always go to its log file)
    decode_batch_size: int = 32  # items per split task; its images decode together in one decode task
    progress_seconds: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "questions", tuple(self.questions))
        object.__setattr__(self, "choices", parse_choices(self.choices))
        object.__setattr__(self, "storage_options", tuple(self.storage_options))
        self._check_task()
        if self.batch_size is not None:
            _positive("batch-size", self.batch_size)
        _positive("workers", self.workers)
        _positive("max-new-tokens", self.max_new_tokens)
        _positive("rows_per_file", self.rows_per_file)
        if not (self.stall_timeout >= 0 and math.isfinite(self.stall_timeout)):
            raise ValueError(f"--stall-timeout must be >= 0 seconds (0: off), got {self.stall_timeout}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"--quantize must be int8 (or left out), got {self.quantize!r}")
        object.__setattr__(self, "dtype", None if self.dtype == "auto" else self.dtype)
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.visual_compress is not None:
            object.__setattr__(self, "visual_compress", VisualCompress.parse(self.visual_compress).spelled())
        if not isinstance(self.fetch_retries, int) or self.fetch_retries < 0:
            raise ValueError(f"--fetch-retries must be an integer >= 0 (0: no retries), got {self.fetch_retries!r}")
        if self.max_rebuilds < 0:
            raise ValueError(f"--max-rebuilds must be >= 0, got {self.max_rebuilds}")
        _positive("decode-batch-size", self.decode_batch_size)
        if self.frames is not None:
            _positive("frames", self.frames)
        if self.max_clips is not None:
            _positive("max-clips", self.max_clips)
        if self.clip_seconds is not None and not (self.clip_seconds >= 0 and math.isfinite(self.clip_seconds)):
            raise ValueError(f"--clip-seconds must be >= 0 (0: one clip per video), got {self.clip_seconds}")
        self._check_clips()
        if not (self.gpus_per_worker >= 0 and math.isfinite(self.gpus_per_worker)):
            raise ValueError(f"--gpus-per-worker must be >= 0 (0 runs on CPU), got {self.gpus_per_worker}")
        if not 0 < self.cpus_per_worker <= 64:
            raise ValueError(f"cpus_per_worker must be in (0, 64], got {self.cpus_per_worker}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"--max-error-rate must be a fraction in [0, 1], got {self.max_error_rate}")
        if self.job_id is not None and not self.job_id.strip():
            raise ValueError("--job-id must not be empty (leave it out to get one)")
        parse_storage_options(self.storage_options)  # raises on malformed pairs

    def _check_task(self) -> None:
        """What to label and where: inputs, out, the task and its prompt or questions, a constraint on the answers."""
        if not self.inputs:
            raise ValueError("give at least one INPUT (a file, directory, glob, s3:// prefix or manifest)")
        if not self.out:
            raise ValueError("give --out, the output directory URI (local path, s3://..., gs://...)")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.task == CAPTION and self.questions:
            raise ValueError("--question is for --task vqa; for captions use --prompt")
        if self.task == VQA and self.prompt is not None:
            raise ValueError("--prompt is for --task caption; for vqa use --question (repeatable)")
        if self.task == VQA and not self.questions and not _has_manifest(self.inputs):
            raise ValueError("--task vqa needs questions: give --question, or a manifest with a questions column")
        if any(not q.strip() for q in self.questions):
            raise ValueError("--question must not be empty")
        if self.choices and self.json_schema is not None:
            raise ValueError("give --choices or --json-schema, not both")
        try:
            self.constraint  # noqa: B018 - parses and checks the choices or the schema
        except ConstraintError as err:
            raise ValueError(f"--choices/--json-schema: {err}") from None

    def _check_clips(self) -> None:
        if self.clips not in CLIP_MODES:
            raise ValueError(f"--clips must be one of {CLIP_MODES}, got {self.clips!r}")
        if self.clips == SHOTS and (self.clip_seconds is not None or self.max_clips is not None):
            raise ValueError("--clip-seconds and --max-clips are for --clips fixed; with --clips shots the clips are "
                             "bounded by --min-clip-seconds and --max-clip-seconds")
        if self.clips == FIXED and (self.min_clip_seconds is not None or self.max_clip_seconds is not None):
            raise ValueError("--min-clip-seconds and --max-clip-seconds are for --clips shots")
        for flag, value in (("decode-workers", self.decode_workers), ("max-bytes", self.max_bytes)):
            if value is not None:
                _positive(flag, value)
        _positive("clips-per-group", self.clips_per_group)
        for flag, value in (("min-clip-seconds", self.min_clip_seconds), ("max-clip-seconds", self.max_clip_seconds)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{flag} must be a positive number of seconds, got {value}")
        try:
            self.decode_settings(image_size=1, frames=1)
        except ValueError as err:
            raise ValueError(str(err).replace("_clip_seconds", "-clip-seconds")) from None

    def decode_settings(self, image_size: int, frames: int, pinpoints: tuple[tuple[int, int], ...] | None = None,
                        dynamic: DynamicResolution | dict | None = None) -> DecodeSettings:
        """The decode stages' settings for a model's input contract (image_size, frames per clip, pinpoints, or
        dynamic resolution: a lavi.resolution.DynamicResolution or ModelInfo.as_dict's dict of one)."""
        given = {"clip_seconds": self.clip_seconds, "max_clips": self.max_clips,
                 "min_clip_seconds": self.min_clip_seconds, "max_clip_seconds": self.max_clip_seconds}
        return DecodeSettings(image_size=image_size, frames_per_clip=frames, clips=self.clips,
                              clips_per_group=self.clips_per_group, max_bytes=self.max_bytes,
                              retries=self.fetch_retries, storage_options=self.storage, pinpoints=pinpoints,
                              dynamic=DynamicResolution.from_dict(dynamic) if dynamic is not None else None,
                              **{k: v for k, v in given.items() if v is not None})

    @property
    def storage(self) -> dict[str, Any]:
        """The parsed fsspec storage options (apply to remote URIs only)."""
        return parse_storage_options(self.storage_options)

    @property
    def constraint(self) -> str | None:
        """The JSON of the run's constraint (schemas.constraint), or None: free text."""
        c = Constraint.of(self.choices, self.json_schema)
        return c.to_json() if c is not None else None

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    @property
    def block_rows(self) -> int:
        """Clips per labeler input block: BLOCK_BATCHES batches, or with auto on a GPU a block large enough for the
        batch its memory allows (the actor splits it into batches of what fits)."""
        if self.batch_size is not None:
            return BLOCK_BATCHES * self.batch_size
        return GPU_AUTO_BLOCK if self.gpus_per_worker > 0 else BLOCK_BATCHES * CPU_BATCH

    @property
    def labeler_batch(self) -> int | None:
        """Generation rows per batch for each labeler actor: the batch size; with auto, CPU_BATCH on CPU and None
        on a GPU (the actor measures what its memory holds)."""
        if self.batch_size is not None or self.gpus_per_worker > 0:
            return self.batch_size
        return CPU_BATCH

    @property
    def use_compile(self) -> bool:
        return self.gpus_per_worker > 0 if self.compile is None else self.compile

    def generation_settings(self) -> dict[str, Any]:
        """The generation settings recorded in the Parquet metadata and checked on resume."""
        return {
            "task": self.task,
            "prompt": self.prompt,  # a resume with other prompts or questions would skip items it never asked
            "questions": list(self.questions),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "frames": self.frames,
            "clip_seconds": self.clip_seconds,
            "max_clips": self.max_clips,
            **({"quantize": self.quantize} if self.quantize else {}),  # int8 labels are not float labels
            **({"dtype": self.dtype} if self.dtype else {}),  # nor float32 labels bf16 ones
            **({"visual_compress": self.visual_compress} if self.visual_compress else {}),
            # other clips, and (for a resume) other clip groups; written only when not the default, so an output
            # of an earlier version, or of a run with the defaults, keeps its settings
            **({"clips": self.clips, "min_clip_seconds": self.min_clip_seconds,
                "max_clip_seconds": self.max_clip_seconds} if self.clips != FIXED else {}),
            **({"clips_per_group": self.clips_per_group}
               if self.clips_per_group != DecodeSettings.clips_per_group else {}),
            **({"constraint": self.constraint} if self.constraint else {}),
        }


def _positive(flag: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"--{flag} must be a positive integer, got {value!r}")


def _has_manifest(inputs: tuple[str, ...]) -> bool:
    return any(i.lower().endswith(MANIFEST_EXTS) for i in inputs)
