"""The template teacher: a grounded trace written from the AU record and the label, no model involved.

Offline and deterministic, it writes towards the ground-truth label and only ever cites AUs the
detector activated, with the detector's boxes, so its traces are grounded by construction and a
rerun writes the same text. It is also the controlled experiment's teacher: told to
(`TemplateTeacher.error_rate`), it makes one of the mistakes `FLAW_KINDS` names on a seeded share
of each face's traces, as a VLM teacher sampled at temperature would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from tag_lightning.answers.grammar import Step, Trace, render_trace
from tag_lightning.au.record import AURecord
from tag_lightning.au.taxonomy import EMOTION_PROTOTYPES
from tag_lightning.boxes import box_iou
from tag_lightning.errors import BadValue
from tag_lightning.traces.teachers import (
    AUHint,
    Proposal,
    TeacherDeclined,
    TeacherRequest,
    au_keys,
    group_by_region,
    measured_aus,
)

NEUTRAL = "neutral"


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
            regions=_join([group[0].region_label for group in group_by_region(cited)]), strongest=strongest.au.name,
            key=strongest.au.key,
        )
        flaw = self._flaw(record, label, measured, cited) if flawed else None
        groups = group_by_region(cited)
        if flaw is not None and flaw["kind"] in ("hallucination", "grounded_extra"):  # appended: an afterthought
            hint = flaw.pop("hint")
            cited, groups = cited + [hint], groups + [[hint]]
        steps = tuple(_step(group, _OBSERVE_ACTIVE, rng(f"step:{au_keys(group)}")) for group in groups)
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
            aus=" + ".join(au_keys(cited)), label=label
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
        groups = group_by_region(cited)
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
                    flaw |= {"step": number, "aus": au_keys(groups[number - 1])}
                return flaw
            if kind == "grounded_extra":
                chosen = uncited[0]  # the strongest activated AU of a region no grounded step inspects
                return {"kind": kind, "au": chosen.au.key, "measured_intensity": round(chosen.intensity, 2),
                        "hint": chosen}
            number = rng.randrange(len(groups)) + 1
            true_box = groups[number - 1][0].box
            disjoint = sorted(box for box in elsewhere if box_iou(box, true_box) == 0.0)
            if disjoint:
                return {"kind": kind, "step": number, "aus": au_keys(groups[number - 1]),
                        "true_box": list(true_box), "box": list(rng.choice(disjoint))}
        return None

    def _neutral(self, measured: list[AUHint], activated: list[AUHint], rng: random.Random) -> Trace:
        """Honest about neutral: say what little is active, inspect regions that are truly relaxed."""
        relaxed = _relaxed_per_region(measured, self.min_intensity)
        if not relaxed:
            raise TeacherDeclined("every face region has an activated AU; none can honestly be called relaxed")
        chosen = rng.sample(relaxed, min(self.relaxed_regions, len(relaxed)))
        groups = group_by_region(chosen)
        if activated:
            global_analysis = rng.choice(_GLOBAL_CONFINED).format(aus=_join(au_keys(activated)))
        else:
            global_analysis = rng.choice(_GLOBAL_AT_REST)
        steps = tuple(_step(group, _OBSERVE_RELAXED, rng) for group in groups)
        conclusion = rng.choice(_CONCLUDE_NEUTRAL).format(aus=_join(au_keys(chosen)))
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


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
