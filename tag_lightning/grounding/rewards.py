"""The GRPO rewards of TAG: format, answer and AU grounding, as pure functions of one parsed completion.

A reward takes a `Completion` (parsed once, boxes in the detector's frame, see `claims.py`) and
the sample's `References`, and returns a `RewardResult`: its value and named parts, which the
GRPO module logs as ``train/rewards/<name>/<part>``. No reward ever raises: the parser is total
and every check below is defined for any parse, garbage included. Both trace formats
(`answers/grammar.py`) are scored by the same rules, through the claims of `claims.py`.

Adding a reward is one function here, one entry in `REWARDS`, and one line under ``rewards:`` in
the GRPO config (its weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tag_lightning.errors import BadValue
from tag_lightning.au.taxonomy import AU_BY_ID
from tag_lightning.grounding.claims import (
    ACTIVE,
    HALLUCINATION,
    MISS,
    NEUTRAL,
    RELAXED_REGIONS,
    SUPPORTED,
    Claim,
    Completion,
    References,
    claims_of,
    evidence,
    passed_over_steps,
    relaxed_regions,
    unverified_steps,
)


@dataclass(frozen=True)
class RewardResult:
    """A reward's value and the named figures it was computed from."""

    value: float
    parts: dict[str, float] = field(default_factory=dict)


Reward = Callable[[Completion, References], RewardResult]


def format_reward(completion: Completion, references: References) -> RewardResult:
    """0..1: the mean of four checks, so a partly well-formed answer earns partial credit.

    ``grammar``: the TAG grammar holds, in either format (no parse error); ``grounded_step``: at
    least one claimed AU has a box (a step names it, or, in the paper's format, the step it is
    matched to has one); ``boxes_in_image``: there are steps and every one has a
    well-formed box inside the image; ``answer_in_labels``: the answer is one of the dataset's labels.
    """
    width, height = references.image_size
    steps = completion.trace.steps
    checks = {
        "grammar": completion.valid,
        "grounded_step": any(claim.box is not None for claim in claims_of(completion, references)),
        "boxes_in_image": bool(steps) and all(
            step.box is not None and step.box[2] <= width and step.box[3] <= height for step in steps
        ),
        "answer_in_labels": completion.answer is not None and completion.answer in references.labels,
    }
    parts = {name: float(passed) for name, passed in checks.items()}
    return RewardResult(sum(parts.values()) / len(parts), parts)


def answer_reward(completion: Completion, references: References) -> RewardResult:
    """1 when the answer names the label (synonyms resolved, `labels.find_label`), else 0."""
    correct = float(completion.answer == references.label)
    return RewardResult(correct, {"answered": float(completion.answer is not None)})


def grounding_reward(completion: Completion, references: References) -> RewardResult:
    """0..1: how well the answer boxes the evidence the face offers for it, less what it asserts wrongly.

    ``Σ_{a in E} IoU_a / (|E| + wrong)``. `E` is the evidence the face offers for the answer's emotion
    (`claims.evidence`: its activated prototype AUs, else the strongest activated ones, at most 3, as
    the template teacher cites them); each counts with the IoU of the answer's best supported box for
    it (0 when the answer does not cite it, or names it only in prose). For a neutral answer `E` is its
    relaxed face regions (at most 2, any of them), each counting with its best supported box. Every
    hallucinated, missed or unverifiable claim, wherever the answer asserts it, and every passed-over
    step of a paper-format answer (a rival box for a region another step grounds) adds a slot worth 0
    to the denominator. An answer the grammar rejects scores 0, and so does a face with no evidence.

    Why this shape: `E` does not depend on what the answer claims, so dropping a supported claim can
    only lower the reward (the paper's mean of the claims' IoUs paid for dropping a correct AU with
    a loose box: 0.768 to 1.0). True AUs beyond `E` neither pay nor cost (a grounded extra step is
    indifferent). For an answer that cites exactly `E`, it is the mean IoU of its claims with the
    hallucinated ones scoring 0, as before.

    Only an answer the grammar reads whole has evidence that can all be checked. Scoring the
    readable part of a broken one pays for hiding a claim where the claim rule cannot see it:
    in the demo's experiment GRPO learned to write a hallucinated step's words into the
    conclusion, breaking the grammar (format reward 0.75 of 1) and lifting the grounding reward from
    0.75 to 1.0 with the hallucination still in the text.
    """
    claims = claims_of(completion, references)
    passed_over = len(passed_over_steps(completion.trace, claims))
    wrong = sum(claim.verdict != SUPPORTED for claim in claims) + passed_over
    cited = _best_supported(claims, completion.answer == NEUTRAL)
    if completion.answer == NEUTRAL:
        regions = relaxed_regions(references.detector_aus, references.activated)
        slots = min(RELAXED_REGIONS, len(regions))
        filled = sorted((iou for region, iou in cited.items() if region in regions), reverse=True)[:slots]
    else:
        wanted = evidence(completion.answer, references.detector_aus, references.activated)
        slots = len(wanted)
        filled = [cited[key] for key in wanted if key in cited]
    claimed_active = {f"AU{claim.au}" for claim in claims if claim.polarity == ACTIVE}
    parts = {
        "mean_iou": sum(claim.iou for claim in claims) / len(claims) if claims else 0.0,
        "hallucinations": float(sum(claim.verdict == HALLUCINATION for claim in claims)),
        "misses": float(sum(claim.verdict == MISS for claim in claims)),
        "claims": float(len(claims)),
        "unverified_steps": float(len(unverified_steps(completion.trace, claims))),
        "passed_over_steps": float(passed_over),
        "readable": float(completion.valid),
        "evidence": float(slots),
        "recall": len(filled) / slots if slots else 0.0,  # the share of the evidence cited with a backed box
        "au_recall": (len(claimed_active & references.activated) / len(references.activated)
                      if references.activated else 0.0),  # as the evaluation's au_recall
    }
    if not completion.valid or slots == 0:
        return RewardResult(0.0, parts)
    return RewardResult(sum(filled) / (slots + wrong), parts)


def _best_supported(claims: list[Claim], by_region: bool) -> dict[str, float]:
    """The best IoU of the answer's supported boxed claims, by AU key (``AU12``), or by face region."""
    best: dict[str, float] = {}
    for claim in claims:
        if claim.verdict != SUPPORTED or claim.box is None or claim.au not in AU_BY_ID:
            continue
        key = AU_BY_ID[claim.au].region if by_region else f"AU{claim.au}"
        best[key] = max(best.get(key, 0.0), claim.iou)
    return best


def au_f1_reward(completion: Completion, references: References) -> RewardResult:
    """-1..1: Facial-R1's AU reward, 2 x F1 - 1, between the AUs the answer claims active (wherever it names
    them, boxed or not) and those the detector activates. Both empty: F1 1; one empty: 0."""
    claimed = {f"AU{claim.au}" for claim in claims_of(completion, references) if claim.polarity == ACTIVE}
    activated = set(references.activated)
    agreed = len(claimed & activated)
    precision = agreed / len(claimed) if claimed else float(not activated)
    recall = agreed / len(activated) if activated else float(not claimed)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return RewardResult(2 * f1 - 1, {"precision": precision, "recall": recall, "f1": f1})


REWARDS: dict[str, Reward] = {
    "format": format_reward,
    "answer": answer_reward,
    "grounding": grounding_reward,
    "au_f1": au_f1_reward,
}
"""Every reward by the name its weight is given under in the config; the one place a name is resolved."""

DEFAULT_WEIGHTS: dict[str, float] = {"format": 0.5, "answer": 1.0, "grounding": 1.0}


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The reward weights of a config, or a `BadValue` naming what is wrong (unknown rewards, no weight
    that is not 0) and the known rewards."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise BadValue(f"unknown reward(s) {unknown} in rewards; known rewards: {', '.join(REWARDS)} "
                       "(a new reward is a function plus an entry in tag_lightning.grounding.rewards.REWARDS)")
    if not weights:
        raise BadValue(f"rewards is empty: give at least one weight, e.g. {DEFAULT_WEIGHTS}")
    bad = {name: weight for name, weight in weights.items()
           if not isinstance(weight, (int, float)) or not math.isfinite(weight)}
    if bad:
        raise BadValue(f"reward weights must be finite numbers, got {bad}")
    if not any(weights.values()):
        raise BadValue(f"every reward weight is 0 ({dict(weights)}): every completion would score 0, so no "
                       "completion has an advantage and GRPO cannot learn; give at least one reward a non-zero weight")
    return {name: float(weight) for name, weight in weights.items()}


def reward_values(completion: Completion, references: References) -> dict[str, float]:
    """Every reward of `REWARDS`, unweighted, for one completion (what evaluation reports of sampled answers)."""
    return {name: reward(completion, references).value for name, reward in REWARDS.items()}


def score(completion: Completion, references: References, weights: Mapping[str, float]) -> tuple[float, dict[str, RewardResult]]:
    """The weighted total and each weighted reward's result, for one completion."""
    results = {name: REWARDS[name](completion, references) for name in weights}
    return sum(weights[name] * result.value for name, result in results.items()), results
