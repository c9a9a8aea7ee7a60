"""The claim rule: what a generated answer asserts about a face, and whether the AU detector backs it.

One definition, used by the trace filter (`data/trace_builder.py`), the GRPO rewards
(`rewards.py`) and the evaluation metrics (`metrics.py`), so SFT keeps only traces that GRPO would
reward and a model is trained on exactly what it is judged by.

A step ``Inspect <region> (AU6, AU12) → … → <bbox>[…]</bbox>`` makes one claim per AU it names.
The polarity of a claim follows from the answer, as the traces are built (`data/teachers.py`):
in a trace whose answer is not neutral, every named AU is *claimed active* (kept traces cite only
activated AUs); in a neutral trace every named AU is *claimed inactive* (neutral traces inspect
relaxed regions). An answer that names no emotion is treated as not neutral: its AUs are
claimed active. Against the detector:

- claimed active, detector activates it: ``supported``; detector does not: ``hallucination``;
- claimed inactive, detector does not activate it: ``supported``; detector does: ``miss``;
- claimed inactive, but the detector has no box for that AU (unknown id, out of view):
  ``unverified`` (there is nothing to compare the box with).

Each claim's box is compared with the detector's box of that AU in one frame: pixels of the
image the detector's boxes are in (the caller maps the model's boxes there first, through the
wrapper's `Frame`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass

from tag_lightning.boxes import box_iou
from tag_lightning.data.labels import find_label
from tag_lightning.data.traces import Trace, parse_trace

NEUTRAL = "neutral"
ACTIVE, INACTIVE = "active", "inactive"
SUPPORTED, HALLUCINATION, MISS, UNVERIFIED = "supported", "hallucination", "miss", "unverified"


@dataclass(frozen=True)
class References:
    """What one sample's answer is checked against.

    `detector_aus` are the AU record's entries (``"AU12" -> {"box": [x1, y1, x2, y2], ...}``) in
    pixels of the `image_size` (width, height) image; `activated` are the AU keys the detector
    activates there (the datamodule's ``activated_aus``: intensity at or above its threshold).
    `labels` are the answers allowed for the sample's dataset.
    """

    label: str
    labels: tuple[str, ...]
    detector_aus: Mapping[str, dict]
    activated: frozenset[str]
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Completion:
    """A generated answer, parsed once: its trace with boxes in the detector's frame, and its grammar errors.

    `answer` is the unified label the answer names (synonyms resolved), None when it names none.
    """

    text: str
    trace: Trace
    errors: tuple[str, ...]
    answer: str | None

    @property
    def valid(self) -> bool:
        return not self.errors


def read_completion(text: object, to_image_frame: Callable[[Trace], Trace] | None = None) -> Completion:
    """Parse any text (never raises); `to_image_frame` maps the model's boxes to the detector's frame."""
    parsed = parse_trace(text)
    trace = parsed.trace if to_image_frame is None else to_image_frame(parsed.trace)
    answer = None if trace.answer is None else find_label(trace.answer)
    return Completion(text if isinstance(text, str) else "", trace, parsed.errors, answer)


@dataclass(frozen=True)
class Claim:
    """One AU named by one step, with its box's agreement with the detector and the verdict."""

    step: int  # 1-based
    au: int
    polarity: str  # ACTIVE or INACTIVE
    box: tuple[int, int, int, int] | None  # the step's box (None when it was missing or malformed)
    detector_box: Sequence[float] | None  # the detector's box of this AU (None when it has none)
    iou: float  # box agreement; 0 when either box is missing
    verdict: str

    @property
    def score(self) -> float:
        """What the claim is worth to the grounding reward: its IoU when the detector backs it, else 0."""
        return self.iou if self.verdict == SUPPORTED else 0.0

    def to_dict(self) -> dict:
        return {"step": self.step, "au": f"AU{self.au}", "polarity": self.polarity,
                "box": None if self.box is None else list(self.box),
                "detector_box": None if self.detector_box is None else list(self.detector_box),
                "iou": round(self.iou, 4), "verdict": self.verdict}


def claim_polarity(answer: str | None) -> str:
    """INACTIVE for a neutral answer, ACTIVE otherwise (see the module doc)."""
    return INACTIVE if answer == NEUTRAL else ACTIVE


def claims_of(completion: Completion, references: References) -> list[Claim]:
    """Every (step, AU) claim of the completion, judged against the detector."""
    return trace_claims(completion.trace, references.detector_aus, references.activated)


def trace_claims(trace: Trace, detector_aus: Mapping[str, dict], activated: Set[str]) -> list[Claim]:
    """Every (step, AU) claim of `trace`, judged against the detector's AU entries and `activated` keys
    (boxes in one frame; see `References`)."""
    polarity = claim_polarity(None if trace.answer is None else find_label(trace.answer))
    claims = []
    for number, step in enumerate(trace.steps, start=1):
        for au in step.aus:
            entry = detector_aus.get(f"AU{au}")
            detector_box = None if entry is None else entry.get("box")
            iou = box_iou(step.box, detector_box) if step.box is not None and detector_box is not None else 0.0
            claims.append(Claim(number, au, polarity, step.box, detector_box, iou,
                                _verdict(polarity, f"AU{au}" in activated, detector_box is not None)))
    return claims


def _verdict(polarity: str, activated: bool, measured: bool) -> str:
    if polarity == ACTIVE:
        return SUPPORTED if activated else HALLUCINATION
    if activated:
        return MISS
    return SUPPORTED if measured else UNVERIFIED
