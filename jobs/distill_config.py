"""`lavi-label distill`'s options (jobs.distill): one frozen config, validated where it is made, and the error for
what the user can change."""
from __future__ import annotations

from dataclasses import dataclass

from schemas.rows import CAPTION


class DistillError(ValueError):
    """What the user can change to make a distillation run (the CLI's usage errors): the message says what."""


@dataclass(frozen=True)
class DistillConfig:
    """One distillation. Each field is the `lavi-label distill` option of its name (`n_sample`: --sample, `tasks`:
    --task, `questions`: --question, `storage_options`: --storage-option, as KEY=VALUE strings); `out` and the
    pipeline stages' outputs may be local or object storage."""

    inputs: tuple[str, ...]
    teacher: str
    student: str
    out: str
    n_sample: int = 1000
    held_out: float = 0.2
    tasks: tuple[str, ...] = (CAPTION,)  # empty: caption; repeats dropped
    prompt: str | None = None
    questions: tuple[str, ...] = ()
    max_new_tokens: int = 48
    batch_size: int | None = None
    gpus_per_worker: float = 0.0
    address: str | None = None
    storage_options: tuple[str, ...] = ()
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    batch_items: int = 32
    loss_per: str = "row"
    freeze_backbones: bool = False
    checkpoint_every: int = 250
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    timing_items: int = 64
    card: str | None = None

    def __post_init__(self) -> None:
        if self.n_sample < 2 or not 0 < self.held_out < 1:
            raise DistillError("--sample must be >= 2 and --held-out a fraction in (0, 1)")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(self.tasks or (CAPTION,))))

    @property
    def storage(self) -> dict:
        """The fsspec storage options (pipeline.storage_options.parse_storage_options; ValueError for a malformed one)."""
        from pipeline.storage_options import parse_storage_options

        return parse_storage_options(self.storage_options)

    def settings(self) -> dict:
        """What a work directory is bound to (distill_settings.json): a rerun with other ones is refused."""
        return {"inputs": list(self.inputs), "teacher": self.teacher, "student": str(self.student),
                "sample": self.n_sample, "held_out": self.held_out, "seed": self.seed, "tasks": list(self.tasks),
                "prompt": self.prompt, "questions": list(self.questions)}
