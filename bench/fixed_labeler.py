"""The scale benchmark's labeler: the real labeler's bookkeeping with no model behind it.

`FixedLabeler` is workers.labeler.Labeler with its inference replaced: every request is answered with one fixed
text at once. What stays is everything the pipeline does per row around a model (requests from a block's clips, the
output rows, their statuses and bookkeeping columns, the row counter), so that `bench pipeline --scale` measures the
listing, reads, decodes and commits of a corpus, and the driver's memory, at rates no model on this machine has.
Used only by the benchmark (pipeline.driver.run's `labeler_class`), never by a labelling run.
"""

from __future__ import annotations

import datetime as dt
import uuid

from schemas.rows import OK
from workers.labeler import Labeler, LabelerSpec
from workers.progress import RowReporter

TEXT = "a fixed caption"


class _Work:
    def as_dict(self) -> dict[str, int]:
        return {}


class _NoModel:
    """What the labeler asks of an engine, without one."""

    max_batch = 1 << 30
    inflight = False

    def __init__(self, name: str, prompts: dict[str, str]) -> None:
        self.name, self.prompts = name, prompts
        self.generator = type("G", (), {"work": _Work()})()

    def default_prompt(self, media_type: str) -> str:
        return self.prompts.get(media_type, self.prompts["image"])


class FixedLabeler(Labeler):
    """A labeler whose every answer is TEXT (see the module doc)."""

    def __init__(self, spec: LabelerSpec) -> None:
        from lavi.serving.steps import GenerationConfig

        from pipeline.models import model_info
        from lavi.bundled import DEFAULT_MODEL

        info = model_info(spec.model or DEFAULT_MODEL, spec.storage_options)
        self._attach(_NoModel(info["name"], info["default_prompts"]), spec.job_id,
                     GenerationConfig(**spec.generation), RowReporter(spec.progress, labeler=uuid.uuid4().hex[:12]))

    def _infer(self, clips, asks, out, rules, inflight=None) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        for i, _, _ in asks:
            out[i].update(text=TEXT, status=OK, num_prompt_tokens=0, num_generated_tokens=1, created_at=now)
