"""The claim rule: what a generated answer asserts about a face, and whether the AU detector backs it.

One definition, used by the trace filter (`traces/builder.py`), the GRPO rewards
(`rewards.py`) and the evaluation metrics (`metrics.py`), so SFT keeps only traces that GRPO would
reward and a model is trained on exactly what it is judged by.

What is claimed, and with which box, depends on the trace's format (`answers/grammar.py`):

- ``per_step``: a step ``Inspect <region> (AU6, AU12) → … → <bbox>[…]</bbox>`` makes one claim per
  AU it names, with its box.
- anywhere, either format: an AU the global analysis or the conclusion names that no step boxes
  (per step: no step names it; paper: not in the conclusion) is a claim without a box (IoU 0): an
  answer asserts it, so it is checked, and a hallucinated one counts as a hallucination. Otherwise a
  step could be dropped while its AU stayed asserted in the conclusion, and read as "flaw removed".
- ``paper``: each AU the conclusion names is one claim, with the box of the step it is matched to:
  among the steps whose region name refers to the AU's region (`au.taxonomy.regions_named`, e.g.
  "mouth region" for AU14), the one whose box agrees best with the detector's box of the AU (the
  first on a tie, or when the detector has no box). Several AUs may share a step, as AU9 and AU4
  share a box in the paper's data figure. An AU no step's region name refers to is a claim without
  a box (IoU 0), as a per-step AU on a step without a box. Matching by name first keeps a wrong
  box wrong: a brow box written under "mouth" is not rescued because it fits the brow AU.
  A step that no claim is matched to is *unverified*: its box backs nothing the answer asserts.
  Two kinds, counted differently by the grounding reward (`rewards.py`):
  - a *passed-over* step names the region of a concluded AU but lost the match to a better box:
    it counts as one claim worth 0, as every box of a per-step trace is one more claim in its
    mean. Otherwise writing several boxes for one region, to let the best be picked, would pay;
  - any other unverified step (a region no concluded AU lives in, as the eye step of the paper's
    figure, whose conclusion names AU14, AU4 and AU17) is left out: it asserts nothing to check,
    so the figure's reward is the mean IoU of its matched boxes.
  So padding an answer with steps that win no claim never raises its reward: a passed-over step
  lowers it, any other leaves it as it was.

The polarity of a claim follows from the answer, as the traces are built (`traces/template.py`):
in a trace whose answer is not neutral, every named AU is *claimed active* (kept traces cite only
activated AUs); in a neutral trace every AU its steps name is *claimed inactive* (neutral traces
inspect relaxed regions), while an AU it names only in prose is stated as the face has it (a
neutral face's global analysis says what little is active), so it is checked to be measured. An
answer that names no emotion is treated as not neutral: its AUs are claimed active. Against the
detector:

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

from tag_lightning.answers.grammar import PAPER, Step, Trace, conclusion_aus, parse_trace, prose_aus, trace_format
from tag_lightning.answers.labels import find_label
from tag_lightning.au.taxonomy import AU_BY_ID, EMOTION_PROTOTYPES, parse_au_key, regions_named
from tag_lightning.boxes import box_iou

NEUTRAL = "neutral"
ACTIVE, INACTIVE = "active", "inactive"
EVIDENCE_AUS = 3
"""The activated AUs an answer is paid for at most: the template teacher cites the label's top 3 and the VLM
teacher is shown the top 3 (`tag prepare traces --top-k`)."""
RELAXED_REGIONS = 2
"""The relaxed regions a neutral answer is paid for at most: the template teacher inspects 2."""
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

    @property
    def trace_format(self) -> str:
        """Which of the two formats the answer was read as (`answers/grammar.py`)."""
        return trace_format(self.trace)


def read_completion(text: object, to_image_frame: Callable[[Trace], Trace] | None = None) -> Completion:
    """Parse any text (never raises); `to_image_frame` maps the model's boxes to the detector's frame."""
    parsed = parse_trace(text)
    trace = parsed.trace if to_image_frame is None else to_image_frame(parsed.trace)
    answer = None if trace.answer is None else find_label(trace.answer)
    return Completion(text if isinstance(text, str) else "", trace, parsed.errors, answer)


@dataclass(frozen=True)
class Claim:
    """One claimed AU, with the box of its step, that box's agreement with the detector and the verdict."""

    step: int | None  # 1-based; None for an AU no step boxes (named only in prose, or unmatched in the paper's format)
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
    """Every claim of `trace` (per step, or the conclusion's AUs matched to steps: see the module doc),
    judged against the detector's AU entries and `activated` keys (boxes in one frame; see `References`)."""
    polarity = claim_polarity(None if trace.answer is None else find_label(trace.answer))

    def judge(number: int | None, au: int) -> Claim:
        box = None if number is None else trace.steps[number - 1].box
        detector_box = _detector_box(detector_aus, au)
        return Claim(number, au, polarity, box, detector_box, _iou(box, detector_box),
                     _verdict(polarity, f"AU{au}" in activated, detector_box is not None))

    if trace_format(trace) == PAPER:
        claims = [judge(_matching_step(trace.steps, au, _detector_box(detector_aus, au)), au)
                  for au in conclusion_aus(trace)]
    else:
        claims = [judge(number, au) for number, step in enumerate(trace.steps, start=1) for au in step.aus]
    boxed = {claim.au for claim in claims}
    for au in prose_aus(trace):
        if au in boxed:
            continue
        detector_box = _detector_box(detector_aus, au)
        stated = polarity if polarity == ACTIVE else (ACTIVE if f"AU{au}" in activated else INACTIVE)
        claims.append(Claim(None, au, stated, None, detector_box, 0.0,
                            _verdict(stated, f"AU{au}" in activated, detector_box is not None)))
    return claims


def evidence(answer: str | None, detector_aus: Mapping[str, dict], activated: Set[str]) -> tuple[str, ...]:
    """The evidence the face offers for `answer`, as the template teacher cites it (`traces/template.py`): the
    activated AUs of the emotion's EMFACS prototype, strongest first, at most `EVIDENCE_AUS`; when none of
    them is active, the `EVIDENCE_AUS` strongest activated AUs. A neutral answer's evidence is relaxed
    regions, any of them (`relaxed_regions`), so it has no AUs here.

    It depends on the face and the answer's label alone, never on which claims the answer makes: what
    `rewards.grounding_reward` pays for cannot move when a claim is dropped.
    """
    if answer == NEUTRAL:
        return ()
    def strength(key: str) -> float:
        return float((detector_aus.get(key) or {}).get("intensity") or 0.0)

    strongest = sorted((key for key in activated if _au_id(key) is not None), key=lambda key: (-strength(key), key))
    prototype = EMOTION_PROTOTYPES.get(answer or "", ())
    return tuple(([key for key in strongest if _au_id(key) in prototype] or strongest)[:EVIDENCE_AUS])


def relaxed_regions(detector_aus: Mapping[str, dict], activated: Set[str]) -> set[str]:
    """The face regions with a measured AU and no activated one: where a neutral answer's evidence lies."""
    regions = {AU_BY_ID[au].region for au in map(_au_id, detector_aus) if au is not None}
    return regions - {AU_BY_ID[au].region for au in map(_au_id, activated) if au is not None}


def _au_id(key: str) -> int | None:
    """The id of an ``AU<n>`` key of a known AU; None for anything else."""
    try:
        return parse_au_key(key)
    except (ValueError, AttributeError):
        return None


def unverified_steps(trace: Trace, claims: Sequence[Claim]) -> tuple[int, ...]:
    """The steps (1-based) of a paper-format `trace` none of its `claims` is matched to; none for per-step
    traces, whose every step names its AUs (one that names none is a format error)."""
    if trace_format(trace) != PAPER:
        return ()
    matched = {claim.step for claim in claims}
    return tuple(number for number in range(1, len(trace.steps) + 1) if number not in matched)


def passed_over_steps(trace: Trace, claims: Sequence[Claim]) -> tuple[int, ...]:
    """The unverified steps (1-based) whose region name refers to the region of a claimed AU: rival
    boxes for evidence another step gives (see the module doc)."""
    claimed_regions = {AU_BY_ID[claim.au].region for claim in claims if claim.au in AU_BY_ID}
    return tuple(number for number in unverified_steps(trace, claims)
                 if claimed_regions & set(regions_named(trace.steps[number - 1].region)))


def _detector_box(detector_aus: Mapping[str, dict], au: int) -> Sequence[float] | None:
    entry = detector_aus.get(f"AU{au}")
    return None if entry is None else entry.get("box")


def _iou(box: Sequence[float] | None, detector_box: Sequence[float] | None) -> float:
    return box_iou(box, detector_box) if box is not None and detector_box is not None else 0.0


def _matching_step(steps: Sequence[Step], au: int, detector_box: Sequence[float] | None) -> int | None:
    """The step (1-based) a conclusion AU is matched to: among those naming the AU's region, the best box."""
    region = AU_BY_ID[au].region if au in AU_BY_ID else None
    candidates = [number for number, step in enumerate(steps, start=1) if region in regions_named(step.region)]
    if not candidates:
        return None
    return max(candidates, key=lambda number: _iou(steps[number - 1].box, detector_box))  # the first on a tie


def _verdict(polarity: str, activated: bool, measured: bool) -> str:
    if polarity == ACTIVE:
        return SUPPORTED if activated else HALLUCINATION
    if activated:
        return MISS
    return SUPPORTED if measured else UNVERIFIED
