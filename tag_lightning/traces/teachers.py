"""Teachers: whatever writes an AU-grounded reasoning trace for one face, behind one interface.

The rejection sampler (`builder.py`) asks a teacher for a trace and judges the answer; it
does not care who wrote it. Three teachers exist:

- `TemplateTeacher`: offline and deterministic, grounded by construction. It writes towards the
  ground-truth label and only ever cites AUs the detector activated, with the detector's boxes.
- `OpenAITeacher`: any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...). It speaks
  HTTP with the standard library's `http.client`: the job needs one POST route, a kept-alive
  connection per thread and retries it controls (backoff with jitter, ``Retry-After``, counted
  per trace). The `openai` SDK would add httpx and friends as dependencies and retry on its own
  beneath ours, so failures would be counted and backed off twice.
- `HFTeacher`: a local Hugging Face image-text-to-text model; it also answers a batch of requests
  in one `generate` call (`propose_many`).

The two VLM teachers get the image, the candidate labels and the top-K activated AUs with their
boxes (`build_prompt`), never the ground-truth label: they must find it, which is what the
rejection sampler checks. Boxes are integer pixels of the original (upright) image throughout.

Both VLM teachers state every sampling parameter (`sampling()`): whatever a request leaves out, a
vLLM server and `generate` take from the model folder's ``generation_config.json``, and
Qwen2.5-VL-Instruct's (``top_k`` 1, ``top_p`` 0.001) decodes near-greedily. Measured: such a folder
gave 1 distinct answer in 4 at temperature 0.7, the unedited one 4 in 4; every trace of an image
and every retry of a rejected answer was the same text.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import io
import json
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from tag_lightning.answers.grammar import COORDINATE_SEPARATOR, PAPER, PER_STEP, Box, Step, Trace, render_trace
from tag_lightning.answers.prompts import user_prompt
from tag_lightning.au.record import AURecord
from tag_lightning.au.taxonomy import AU_BY_ID, EMOTION_PROTOTYPES, REGIONS, ActionUnit, parse_au_key
from tag_lightning.boxes import box_iou, round_box
from tag_lightning.errors import BadValue, UserError
from tag_lightning.images import ImageRef, decode_image

NEUTRAL = "neutral"


# ---------------------------------------------------------------------------------------------
# The interface


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


# ---------------------------------------------------------------------------------------------
# The template teacher

# Several phrasings per sentence kind; the RNG picks one. Every claim is about an activated AU
# (or, for neutral faces, about regions whose AUs are all below the activation threshold).
_GLOBAL_ACTIVE = (
    "Muscle activity is visible around the {regions}; the strongest action is the {strongest} ({key}).",
    "The face is animated: the clearest movement is the {strongest} ({key}), with activity around the {regions}.",
    "Looking at the whole face, the {regions} are active, and the {strongest} ({key}) is the strongest action.",
)
_GLOBAL_AT_REST = (
    "The face is at rest: no action unit reaches the activation threshold.",
    "No strong AU activity anywhere on the face; the features look relaxed.",
    "No action unit is clearly active, and the face looks calm overall.",
)
_GLOBAL_CONFINED = (
    "Muscle activity is confined to {aus}; the rest of the face looks relaxed.",
    "Apart from {aus}, no action unit is active and the features look relaxed.",
)
_OBSERVE_ACTIVE = (
    "{degree} {name}: {description} (intensity {intensity})",
    "the {name} {description}, {degree} at intensity {intensity}",
    "{degree} activity, the {name} {description} (intensity {intensity})",
)
_OBSERVE_RELAXED = (
    "relaxed, no {name} activity (intensity {intensity})",
    "at rest: the {name} is inactive (intensity {intensity})",
    "calm, the {name} stays below activation (intensity {intensity})",
)
_CONCLUDE_PROTOTYPE = (
    "The activation of {aus} indicates a dominant emotion of {label}.",
    "The evidence of {aus} matches the {label} prototype, so the expression is {label}.",
    "Taken together, the activity of {aus} points to {label}.",
)
_CONCLUDE_FALLBACK = (
    "None of the typical {label} action units is clearly active; the strongest cues, {aus}, "
    "are best read as {label}.",
    "The classic {label} units are weak here, but the activity of {aus} remains compatible with a "
    "dominant emotion of {label}.",
)
_CONCLUDE_NEUTRAL = (
    "With {aus} at rest, the dominant emotion is neutral.",
    "There is no activation at {aus}, so the face reads as neutral.",
    "The relaxed state of {aus} indicates a neutral expression.",
)
# FACS scores intensity A (trace) to E (maximum); the detector's 0-5 scale maps onto it.
_DEGREES = ((4.0, "intense"), (3.0, "pronounced"), (2.0, "moderate"), (1.0, "slight"), (float("-inf"), "faint"))


FLAW_KINDS = ("hallucination", "wrong_box", "swapped_au", "grounded_extra")
"""The deviations the template teacher can be told to make (`TemplateTeacher.error_rate`):
``hallucination``: an extra step after the grounded ones cites an AU the detector does not activate
(with that AU's region box), described as active and counted in the conclusion; ``wrong_box``:
one cited step carries the box of another face region; ``swapped_au``: one cited step names an AU
the detector does not activate in place of its own, its wording and box kept (a flaw of the same
length as the grounded trace, in place); ``grounded_extra``: a placebo, not a flaw: an extra last
step cites an activated AU the others do not, with its own box (as long as the hallucination, and
grounded).

The extra step comes last, not in the top-to-bottom order of the others, so that the flawed and the
grounded traces of a face share every token up to one choice: one more step, or the conclusion.
Measured with the step in its anatomical place (the demo's tiny model, 300 SFT steps on 3 flawed
and 1 grounded trace per face): where the step fell mid-trace (surprise's AU5, happiness's AU9),
the model sampled the grounded path in few of 8 answers and then lost its place, repeating a step,
so 30 GRPO steps found no clean grounded answer to prefer and the flaw stayed in 8 of 8 samples;
where it fell last (anger's AU23, disgust's AU10) GRPO removed it from the greedy answer."""
DEFAULT_FLAW_KINDS = ("hallucination", "wrong_box")
"""The kinds `tag prepare traces --error-rate` draws from unless told otherwise."""


@dataclass(frozen=True)
class TemplateTeacher:
    """Writes a grounded trace from the AU record and the ground-truth label, no model involved.

    Steps cite the top-K activated AUs that support the label (`EMOTION_PROTOTYPES`), or the
    strongest activated AUs when none of the label's AUs is active. A neutral face gets
    `relaxed_regions` steps on regions whose AUs are all inactive, described as relaxed. The
    phrasing is drawn from an RNG keyed on `seed` and the image content, so a rerun writes the
    same text. Raises `TeacherDeclined` when no honest trace exists (an emotion with no
    activated AU at all, or a neutral face without a relaxed region).

    **A controlled experiment** (`error_rate` > 0): the teacher errs the way a VLM teacher sampled
    at temperature does, always naming the right label. Of an image's `count` traces
    (`TeacherRequest.count`, the builder's ``traces_per_image``), ``round(error_rate * count)``
    carry a flaw and the others are grounded. The flaw is one per face, the systematic mistake
    this teacher makes on it: its kind is drawn from `error_kinds` (see `FLAW_KINDS`), its AU or
    region from the face's record, all keyed on `seed` and the image content, so a rebuild writes
    the same traces. Which of the image's traces carry it is drawn the same way. Rejection on the
    label and the format alone (TAG's filter) keeps such traces; the grounding filter drops them.
    """

    top_k: int = 3
    min_intensity: float = 1.0
    relaxed_regions: int = 2
    seed: int = 0
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = FLAW_KINDS
    name = "template"

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise BadValue(f"error_rate must lie in [0, 1], got {self.error_rate}")
        unknown = sorted(set(self.error_kinds) - set(FLAW_KINDS))
        if unknown or not self.error_kinds:
            raise BadValue(f"error kinds must be some of {', '.join(FLAW_KINDS)}, got {list(self.error_kinds)}")

    def propose(self, request: TeacherRequest) -> Proposal:
        flawed = self.is_flawed(request.record, request.index, request.count)
        trace, flaw = self.compose(request.record, request.label, flawed)
        return Proposal(render_trace(trace, request.trace_format), flaw=flaw)

    def is_flawed(self, record: AURecord, index: int, count: int) -> bool:
        """Whether trace `index` of the image's `count` carries the face's flaw (see the class doc)."""
        flawed = round(self.error_rate * count)
        order = list(range(count))
        random.Random(f"{self.seed}:flawed:{record.content_hash}").shuffle(order)
        return index in order[:flawed]

    def write(self, record: AURecord, label: str, flawed: bool = False) -> Trace:
        """The trace for `label`, with the face's flaw when `flawed` (and one exists)."""
        return self.compose(record, label, flawed)[0]

    def compose(self, record: AURecord, label: str, flawed: bool = False) -> tuple[Trace, dict | None]:
        """The trace for `label` and the flaw it carries (None: grounded).

        Each sentence's phrasing is drawn from its own RNG (keyed on the seed, the image and the
        sentence), so a flawed trace reads exactly as the grounded one but for its flaw.
        """
        def rng(part: str) -> random.Random:
            return random.Random(f"{self.seed}:{record.content_hash}:{part}")

        measured = measured_aus(record)
        activated = [hint for hint in measured if hint.intensity >= self.min_intensity]
        if label == NEUTRAL:
            return self._neutral(measured, activated, rng("neutral")), None
        if not activated:
            raise TeacherDeclined(
                f"no AU reaches intensity {self.min_intensity}, so a {label} trace would cite nothing the detector saw"
            )
        supporting = [hint for hint in activated if hint.au.id in EMOTION_PROTOTYPES[label]][: self.top_k]
        cited = supporting or activated[: self.top_k]
        strongest = activated[0]
        global_analysis = rng("global").choice(_GLOBAL_ACTIVE).format(
            regions=_join([group[0].region_label for group in _group_by_region(cited)]), strongest=strongest.au.name,
            key=strongest.au.key,
        )
        flaw = self._flaw(record, label, measured, cited) if flawed else None
        groups = _group_by_region(cited)
        if flaw is not None and flaw["kind"] in ("hallucination", "grounded_extra"):  # appended: an afterthought
            hint = flaw.pop("hint")
            cited, groups = cited + [hint], groups + [[hint]]
        steps = tuple(_step(group, _OBSERVE_ACTIVE, rng(f"step:{_keys(group)}")) for group in groups)
        if flaw is not None and flaw["kind"] == "wrong_box":
            number = flaw["step"] - 1
            steps = steps[:number] + (replace(steps[number], box=tuple(flaw["box"])),) + steps[number + 1:]
        if flaw is not None and flaw["kind"] == "swapped_au":  # the step reads as before, naming another AU
            number, hint = flaw["step"] - 1, flaw.pop("hint")
            steps = steps[:number] + (replace(steps[number], aus=(hint.au.id,)),) + steps[number + 1:]
            position = cited.index(groups[number][0])  # the conclusion names it where the step's AUs were
            cited = [other for other in cited if other not in groups[number]]
            cited.insert(position, hint)
        conclusion = rng("conclusion").choice(_CONCLUDE_PROTOTYPE if supporting else _CONCLUDE_FALLBACK).format(
            aus=" + ".join(_keys(cited)), label=label
        )
        return Trace(global_analysis, steps, conclusion, label), flaw

    def _flaw(self, record: AURecord, label: str, measured: list[AUHint], cited: list[AUHint]) -> dict | None:
        """The face's flaw (the same for every flawed trace of it), or None when no kind fits it.

        A hallucination cites an AU the detector does not activate, from a region no grounded step
        inspects: one of the label's prototype AUs when one is inactive (a teacher seeing what it
        expects), else any. A wrong box moves one step's box onto a region it does not overlap.
        """
        rng = random.Random(f"{self.seed}:flaw:{record.content_hash}")
        cited_regions = {hint.au.region for hint in cited}
        inactive = [hint for hint in measured if hint.intensity < self.min_intensity and hint.au.region not in cited_regions]
        expected = [hint for hint in inactive if hint.au.id in EMOTION_PROTOTYPES.get(label, ())]
        uncited = [hint for hint in measured if hint.intensity >= self.min_intensity and hint.au.region not in cited_regions]
        groups = _group_by_region(cited)
        elsewhere = {hint.box for hint in measured if hint.au.region not in cited_regions}
        fits = {"hallucination": bool(inactive), "swapped_au": bool(inactive), "grounded_extra": bool(uncited)}
        kinds = [kind for kind in self.error_kinds if fits.get(kind, True)]
        for kind in rng.sample(kinds, len(kinds)):
            if kind in ("hallucination", "swapped_au"):
                chosen = rng.choice(expected or inactive)
                intensity = round(self.min_intensity + rng.uniform(0.2, 1.5), 2)  # claimed, not measured
                flaw = {"kind": kind, "au": chosen.au.key, "measured_intensity": round(chosen.intensity, 2),
                        "hint": AUHint(chosen.au, intensity, chosen.box)}
                if kind == "swapped_au":  # in the place of one cited step's AUs, that step's box kept
                    number = rng.randrange(len(groups)) + 1
                    flaw |= {"step": number, "aus": _keys(groups[number - 1])}
                return flaw
            if kind == "grounded_extra":
                chosen = uncited[0]  # the strongest activated AU of a region no grounded step inspects
                return {"kind": kind, "au": chosen.au.key, "measured_intensity": round(chosen.intensity, 2),
                        "hint": chosen}
            number = rng.randrange(len(groups)) + 1
            true_box = groups[number - 1][0].box
            disjoint = sorted(box for box in elsewhere if box_iou(box, true_box) == 0.0)
            if disjoint:
                return {"kind": kind, "step": number, "aus": _keys(groups[number - 1]),
                        "true_box": list(true_box), "box": list(rng.choice(disjoint))}
        return None

    def _neutral(self, measured: list[AUHint], activated: list[AUHint], rng: random.Random) -> Trace:
        """Honest about neutral: say what little is active, inspect regions that are truly relaxed."""
        relaxed = _relaxed_per_region(measured, self.min_intensity)
        if not relaxed:
            raise TeacherDeclined("every face region has an activated AU; none can honestly be called relaxed")
        chosen = rng.sample(relaxed, min(self.relaxed_regions, len(relaxed)))
        groups = _group_by_region(chosen)
        if activated:
            global_analysis = rng.choice(_GLOBAL_CONFINED).format(aus=_join(_keys(activated)))
        else:
            global_analysis = rng.choice(_GLOBAL_AT_REST)
        steps = tuple(_step(group, _OBSERVE_RELAXED, rng) for group in groups)
        conclusion = rng.choice(_CONCLUDE_NEUTRAL).format(aus=_join(_keys(chosen)))
        return Trace(global_analysis, steps, conclusion, NEUTRAL)


def _relaxed_per_region(measured: list[AUHint], min_intensity: float) -> list[AUHint]:
    """The calmest AU of each region whose measured AUs all stay below `min_intensity`."""
    by_region: dict[str, list[AUHint]] = {}
    for hint in measured:
        by_region.setdefault(hint.au.region, []).append(hint)
    return [
        min(hints, key=lambda hint: hint.intensity)
        for hints in by_region.values()
        if all(hint.intensity < min_intensity for hint in hints)
    ]


def _group_by_region(hints: list[AUHint]) -> list[list[AUHint]]:
    """AUs sharing a region box share a step; steps run top of the face to the bottom."""
    groups: dict[tuple[str, Box], list[AUHint]] = {}
    for hint in hints:
        groups.setdefault((hint.au.region, hint.box), []).append(hint)
    region_order = list(REGIONS)
    ordered = sorted(groups.items(), key=lambda item: (region_order.index(item[0][0]), item[0][1]))
    return [sorted(group, key=lambda hint: hint.au.id) for _, group in ordered]


def _step(group: list[AUHint], templates: tuple[str, ...], rng: random.Random) -> Step:
    observation = "; ".join(
        rng.choice(templates).format(
            degree=_degree(hint.intensity), name=hint.au.name, description=hint.au.description,
            intensity=f"{hint.intensity:.2f}",
        )
        for hint in group
    )
    return Step(group[0].region_label, tuple(hint.au.id for hint in group), observation, group[0].box)


def _degree(intensity: float) -> str:
    return next(word for floor, word in _DEGREES if intensity >= floor)


def _keys(hints: list[AUHint]) -> list[str]:
    return [hint.au.key for hint in sorted(hints, key=lambda hint: hint.au.id)]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ---------------------------------------------------------------------------------------------
# The prompt of the VLM teachers


# Where the AU ids go, in the words of the evidence's closing instruction.
_WHERE_AUS_GO = {PER_STEP: "in each step", PAPER: "in the final conclusion"}


def build_prompt(request: TeacherRequest) -> str:
    """The student's question (`prompts.user_prompt`, in the request's format) plus the detector's
    evidence with boxes.

    Asking the teacher the student's exact question keeps the format it writes identical to
    the one the student is trained and rewarded on. Without activated AUs (a calm face) the
    region boxes are listed instead, so the teacher can still ground its inspection steps.
    """
    width, height = request.record.size or (0, 0)
    lines = [user_prompt(request.candidates, request.trace_format), "", f"The image is {width}x{height} pixels."]
    where = _WHERE_AUS_GO[request.trace_format]
    if request.hints:
        lines.append("An AU detector found these activated action units (intensity 0-5, strongest first):")
        lines += [
            f"- {hint.au.key} {hint.au.name} ({hint.region_label}): intensity {hint.intensity:.2f}, "
            f"box {_box_text(hint.box)}"
            for hint in request.hints
        ]
        lines.append(f"Inspect the regions of these action units only, name their AU ids {where}, and copy their "
                     "boxes.")
    else:
        lines.append("An AU detector found no activated action unit. The face regions, their AUs and boxes:")
        lines += [
            f"- {group[0].region_label} ({', '.join(_keys(group))}): box {_box_text(group[0].box)}"
            for group in _group_by_region(measured_aus(request.record))
        ]
        lines.append(f"Inspect some of these regions, name the AUs you check {where}, and copy each region's box.")
    return "\n".join(lines)


def _box_text(box: Box) -> str:
    """A box as the trace grammar writes it, so that copying it verbatim is correct."""
    return "[" + COORDINATE_SEPARATOR.join(map(str, box)) + "]"


def image_data_url(data: bytes) -> str:
    """The image as a base64 data URL, re-encoded as PNG unless the bytes are web-ready and upright.

    Boxes are in upright pixels, so an image with an EXIF rotation is sent already rotated.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, orientation = image.format, image.getexif().get(0x0112, 1)
    except (OSError, ValueError) as err:
        raise TeacherError(f"the image cannot be sent: {err}") from err
    if kind not in ("JPEG", "PNG", "WEBP") or orientation != 1:
        buffer = io.BytesIO()
        Image.fromarray(decode_image(data)[0]).save(buffer, format="PNG")
        data, kind = buffer.getvalue(), "PNG"
    return f"data:image/{kind.lower()};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible teacher


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures: timeouts, dropped connections, HTTP 429 and 5xx.

    The jitter spreads the retries of many conversations in flight, which would otherwise all hit a
    recovering server in the same instant. A server's ``Retry-After`` is a floor on the wait.
    """

    max_retries: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.5  # the wait is drawn uniformly from [(1 - jitter) * backoff, backoff]

    def delay(self, retry: int, retry_after: float | None = None, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (0-based), at least `retry_after`."""
        backoff = min(self.max_delay, self.base_delay * 2**retry)
        return max(backoff * (1.0 - self.jitter * draw()), retry_after or 0.0)


class _Transient(Exception):
    """A failure worth retrying after a pause (`retry_after`: the server's ``Retry-After``, seconds)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


_DROPPED = (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)


def _checked_top_p(top_p: float) -> float:
    """A VLM teacher's nucleus mass: the most likely tokens that make up this share of the probability (1: all)."""
    if not 0 < top_p <= 1:
        raise BadValue(f"top_p must lie in (0, 1] (1: sample from every token), got {top_p}")
    return top_p


class OpenAITeacher:
    """A chat model behind an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    The API key is read from the environment variable named `api_key_env` (a key never goes on
    a command line); without it no Authorization header is sent, which local servers such as
    vLLM accept. Sends `max_tokens`, every sampling parameter (`sampling`) and a `seed` per request
    (see `request_seed`).
    Safe to call from many threads at once: each thread keeps its own connection alive
    (`http.client`), so N conversations in flight hold N connections, not one per request.
    Environment proxy variables are not read: point `base_url` at the server itself.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        seed: int | None = 0,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadValue(f"the teacher's base URL must be http(s)://HOST[:PORT]/PATH, got {base_url!r}")
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._address = parts.netloc.rpartition("@")[2]
        self._path = parts.path
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.retry = retry
        self.temperature = temperature
        self.top_p = _checked_top_p(top_p)
        self.max_tokens = max_tokens
        self.seed = seed
        self.name = f"openai:{model}"
        self._headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()  # this thread's connection

    def settings(self) -> dict[str, Any]:
        """What the run's statistics record of this teacher (never the key)."""
        return {"name": self.name, "base_url": self.base_url, "model": self.model, **self.sampling(),
                "max_tokens": self.max_tokens, "seed": self.seed, "timeout": self.timeout,
                "max_retries": self.retry.max_retries}

    def sampling(self) -> dict[str, Any]:
        """The sampling fields of every request, none left to the server's defaults (see the module doc).

        ``top_k`` (-1: off) and ``repetition_penalty`` are extra fields that vLLM reads; OpenAI's own API
        refuses fields it does not know (HTTP 400), which ends the job with its message.
        """
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": -1, "repetition_penalty": 1.0}

    def propose(self, request: TeacherRequest) -> Proposal:
        body = json.dumps(self._payload(request)).encode("utf-8")
        errors: list[str] = []
        for retry in range(self.retry.max_retries + 1):
            try:
                text, tokens = self._post(body)
                return Proposal(text, retries=retry, errors=tuple(errors), tokens=tokens)
            except _Transient as err:
                errors.append(str(err))
                if retry < self.retry.max_retries:
                    time.sleep(self.retry.delay(retry, err.retry_after))
        raise TeacherError(
            f"{self.url}: no answer after {len(errors)} tries; last error: {errors[-1]}",
            retries=len(errors) - 1, errors=tuple(errors),
        )

    def request_seed(self, request: TeacherRequest) -> int | None:
        """The sampling seed of one request, drawn from `seed`, the image, the trace and the attempt.

        A server that honours seeds (vLLM) then samples reproducibly, while a retry or another trace
        of the same image is a fresh draw rather than the same answer again.
        """
        if self.seed is None:
            return None
        key = f"{self.seed}:{request.record.content_hash}:{request.index}:{request.attempt}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big") >> 1  # 31 bits: any server's int

    def probe(self, timeout: float = 10.0) -> None:
        """Raise `TeacherSetupError` unless the endpoint answers a cheap ``GET {base_url}/models``.

        Called before the first image, so that a dead endpoint ends the job in seconds rather than
        after every image's retries. Any HTTP answer but a refused key counts as alive (not every
        OpenAI-compatible server serves ``/models``).
        """
        connection = self._connection_class(self._address, timeout=min(timeout, self.timeout))
        try:
            connection.request("GET", self._path + "/models", headers=self._headers)
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as err:
            raise TeacherSetupError(f"{self.base_url} does not answer ({err}); is the server running, and is the "
                                    "base URL right?") from err
        finally:
            connection.close()
        if status in (401, 403):
            raise self._key_refused(f"HTTP {status}")

    def _key_refused(self, detail: str) -> TeacherSetupError:
        return TeacherSetupError(f"{self.url} refused the API key ({detail}); "
                                 f"put a valid key in the environment variable {self.api_key_env}")

    def _payload(self, request: TeacherRequest) -> dict[str, Any]:
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(request.image.read_bytes())}},
            {"type": "text", "text": build_prompt(request)},
        ]
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            **self.sampling(),
        }
        seed = self.request_seed(request)
        return payload if seed is None else payload | {"seed": seed}

    def _post(self, body: bytes) -> tuple[str, int | None]:
        """One request: the answer and its token count; `_Transient` for what a retry may fix, errors for the rest."""
        try:
            status, headers, raw = self._exchange(self._path + "/chat/completions", body)
        except (OSError, http.client.HTTPException) as err:
            raise _Transient(f"{type(err).__name__}: {err}") from err
        if 200 <= status < 300:
            return _answer(raw, self.url)
        detail = f"HTTP {status}: {raw[:300].decode('utf-8', errors='replace').strip()}"
        if status == 429 or status >= 500:
            raise _Transient(detail, _retry_after(headers.get("Retry-After")) if status in (429, 503) else None)
        if status in (401, 403):
            raise self._key_refused(detail)
        if status == 404:
            raise TeacherSetupError(f"{self.url} answered {detail}; check the base URL (OpenAI-compatible "
                                    f"servers usually end in /v1) and the model name {self.model!r}")
        raise TeacherError(f"{self.url} rejected the request ({detail})")

    def _exchange(self, path: str, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One POST on this thread's kept-alive connection: status, headers, body.

        A server may close an idle kept-alive connection at any time; when a reused one turns out
        closed, the request goes once more, at once, on a new connection (no failure, no backoff).
        """
        connection = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None:
            try:
                return self._send(connection, path, body)
            except _DROPPED:
                pass
        self._local.connection = self._connection_class(self._address, timeout=self.timeout)
        return self._send(self._local.connection, path, body)

    def _send(self, connection: http.client.HTTPConnection, path: str, body: bytes
              ) -> tuple[int, http.client.HTTPMessage, bytes]:
        try:
            connection.request("POST", path, body=body, headers=self._headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        except BaseException:  # a half-done exchange leaves the connection unusable
            connection.close()
            raise


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _answer(raw: bytes, url: str) -> tuple[str, int | None]:
    """The assistant message of a chat completion and its `usage` token count; an empty refusal reads as empty."""
    try:
        completion = json.loads(raw)
        content = completion["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise TeacherError(f"{url} did not answer with a chat completion: {raw[:200]!r}") from err
    usage = completion.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return (content if isinstance(content, str) else ""), (tokens if isinstance(tokens, int) else None)


# ---------------------------------------------------------------------------------------------
# The local Hugging Face teacher


class HFTeacher:
    """A local Hugging Face image-text-to-text model (Qwen2-VL, Qwen2.5-VL, ...) and its processor."""

    def __init__(self, model: Any, processor: Any, name: str, max_new_tokens: int = 1024, temperature: float = 0.7,
                 top_p: float = 1.0):
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # a batch's answers all start where its prompts end
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = _checked_top_p(top_p)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", **options: Any) -> HFTeacher:
        """Load a model folder written by ``save_pretrained`` (local only: nothing is downloaded)."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no Hugging Face model at {folder} (missing config.json); pass the folder of a saved "
                "image-text-to-text model and its processor"
            )
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(folder)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto").to(device)
        except (OSError, ValueError, KeyError) as err:
            raise BadValue(
                f"{folder} does not load as an image-text-to-text model with its processor ({err}); "
                "it needs the model's config and weights plus the processor files (save both with save_pretrained)"
            ) from err
        return cls(model, processor, f"hf:{folder.name}", **options)

    def settings(self) -> dict[str, Any]:
        """What the run's statistics record of this teacher."""
        return {"name": self.name, **self.sampling(), "max_new_tokens": self.max_new_tokens}

    def sampling(self) -> dict[str, Any]:
        """`generate`'s decoding arguments, none left to the model folder's generation config (see the module doc).

        ``top_k`` 0 is off. Greedy decoding (temperature 0) uses neither temperature, top_p nor top_k,
        and transformers warns when they are passed to it.
        """
        if self.temperature <= 0:
            return {"do_sample": False, "repetition_penalty": 1.0}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                "repetition_penalty": 1.0}

    def propose(self, request: TeacherRequest) -> Proposal:
        return self.propose_many([request])[0]

    def propose_many(self, requests: list[TeacherRequest]) -> list[Proposal]:
        """Answer several requests with one `generate` call: the same prompts as one at a time,
        left-padded (the processor's tokenizer pads on the left, so every answer starts at the
        same position and greedy decoding writes what it writes alone)."""
        import torch

        images = [Image.fromarray(decode_image(request.image.read_bytes(), request.image.name)[0])
                  for request in requests]
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(request)}]}],
                add_generation_prompt=True, tokenize=False,
            )
            for request in requests
        ]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.sampling())
        answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [Proposal(answer) for answer in answers]
