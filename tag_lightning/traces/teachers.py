"""Teachers: whatever writes an AU-grounded reasoning trace for one face, behind one interface.

The rejection sampler (`builder.py`) asks a teacher for a trace and judges the answer; it
does not care who wrote it. This module is that interface: what a teacher is asked
(`TeacherRequest`), what it answers (`Proposal`), the `Teacher` protocol and its errors. Three
teachers exist:

- `TemplateTeacher` (`template.py`): offline and deterministic, grounded by construction. It writes
  towards the ground-truth label and only ever cites AUs the detector activated, with the
  detector's boxes.
- `OpenAITeacher` (`openai_client.py`): any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...).
- `HFTeacher` (`hf_teacher.py`): a local Hugging Face image-text-to-text model; it also answers a batch
  of requests in one `generate` call (`propose_many`).

The two VLM teachers get the image, the candidate labels and the top-K activated AUs with their
boxes (`prompt.build_prompt`), never the ground-truth label: they must find it, which is what the
rejection sampler checks. Boxes are integer pixels of the original (upright) image throughout.

Both VLM teachers state every sampling parameter (`sampling()`): whatever a request leaves out, a
vLLM server and `generate` take from the model folder's ``generation_config.json``, and
Qwen2.5-VL-Instruct's (``top_k`` 1, ``top_p`` 0.001) decodes near-greedily. Measured: such a folder
gave 1 distinct answer in 4 at temperature 0.7, the unedited one 4 in 4; every trace of an image
and every retry of a rejected answer was the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tag_lightning.answers.grammar import PER_STEP, Box
from tag_lightning.au.record import AURecord
from tag_lightning.au.taxonomy import AU_BY_ID, REGIONS, ActionUnit, parse_au_key
from tag_lightning.boxes import round_box
from tag_lightning.errors import BadValue, UserError
from tag_lightning.images import ImageRef


@dataclass(frozen=True)
class AUHint:
    """One measured AU of a face: what it is, how strong, and the box of its region."""

    au: ActionUnit
    intensity: float
    box: Box

    @property
    def region_label(self) -> str:
        return REGIONS[self.au.region]["label"]


def measured_aus(record: AURecord) -> list[AUHint]:
    """Every AU of the record with an intensity and a box, strongest first."""
    hints = [
        AUHint(AU_BY_ID[parse_au_key(key)], float(entry["intensity"]), tuple(round_box(entry["box"])))
        for key, entry in record.aus.items()
        if entry.get("intensity") is not None and entry.get("box") is not None
    ]
    return sorted(hints, key=lambda hint: (-hint.intensity, hint.au.id))


def activated_aus(record: AURecord, min_intensity: float) -> list[AUHint]:
    """The AUs the detector activated (intensity >= `min_intensity`), strongest first."""
    return [hint for hint in measured_aus(record) if hint.intensity >= min_intensity]


def group_by_region(hints: list[AUHint]) -> list[list[AUHint]]:
    """AUs sharing a region box share a step; steps run top of the face to the bottom."""
    groups: dict[tuple[str, Box], list[AUHint]] = {}
    for hint in hints:
        groups.setdefault((hint.au.region, hint.box), []).append(hint)
    region_order = list(REGIONS)
    ordered = sorted(groups.items(), key=lambda item: (region_order.index(item[0][0]), item[0][1]))
    return [sorted(group, key=lambda hint: hint.au.id) for _, group in ordered]


def au_keys(hints: list[AUHint]) -> list[str]:
    """The AU keys of `hints` (``AU12``...), in AU order: how a trace and a prompt name them."""
    return [hint.au.key for hint in sorted(hints, key=lambda hint: hint.au.id)]


@dataclass(frozen=True)
class TeacherRequest:
    """Everything a teacher may use for one face.

    `label` is the ground truth: the template teacher writes towards it, the VLM teachers never
    see it. `candidates` shrink as wrong answers are eliminated. `hints` are the top-K
    activated AUs, strongest first. `trace_format` is the format asked for (`grammar.TRACE_FORMATS`).
    """

    record: AURecord
    image: ImageRef
    label: str
    candidates: tuple[str, ...]
    hints: tuple[AUHint, ...]
    index: int = 0  # which of the image's traces this is (`traces_per_image`)
    count: int = 1  # how many traces the image gets
    attempt: int = 0  # answers this trace has had already (each retry is asked afresh)
    trace_format: str = PER_STEP


@dataclass(frozen=True)
class Proposal:
    """A teacher's raw answer and the transient transport failures it took to get it.

    `flaw` describes a mistake the teacher made on purpose (the template teacher's controlled
    experiment, `TemplateTeacher.error_rate`); it is recorded with the trace. `tokens`: the
    answer's length in tokens, when the teacher reports it.
    """

    text: str
    retries: int = 0
    errors: tuple[str, ...] = ()
    flaw: dict | None = None
    tokens: int | None = None


class Teacher(Protocol):
    """Anything that answers a request with trace text; `name` is recorded with each kept trace.

    A teacher that answers several requests in one call (a local model generating a batch) also
    has ``propose_many(requests) -> list[Proposal]``; one that describes its settings for the run's
    statistics has ``settings() -> dict``; one that samples says how in ``sampling() -> dict`` (the
    builder then warns when it writes the same trace twice for an image).
    """

    name: str

    def propose(self, request: TeacherRequest) -> Proposal: ...


class TeacherError(RuntimeError):
    """No answer for this sample (transport failures persisted, or the request was refused).

    The trace builder records the sample as failed and goes on with the next one.
    """

    def __init__(self, message: str, retries: int = 0, errors: tuple[str, ...] = ()):
        super().__init__(message)
        self.retries = retries
        self.errors = errors


class TeacherDeclined(TeacherError):
    """The teacher cannot write an honest grounded trace for this sample (asking again won't help)."""


class TeacherSetupError(UserError):
    """The teacher cannot serve the job (bad key, URL or model name, or it does not answer): the job must stop."""


def checked_top_p(top_p: float) -> float:
    """A VLM teacher's nucleus mass: the most likely tokens that make up this share of the probability (1: all)."""
    if not 0 < top_p <= 1:
        raise BadValue(f"top_p must lie in (0, 1] (1: sample from every token), got {top_p}")
    return top_p
