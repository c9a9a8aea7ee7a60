"""The claim rule on the paper's trace format: conclusion AUs matched to steps, hand-computed rewards, and
padding with steps that back nothing never paying."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tag_lightning.answers.grammar import PAPER, PER_STEP, Step, Trace, parse_trace, render_trace
from tag_lightning.au.taxonomy import ACTION_UNITS, REGIONS
from tag_lightning.grounding.claims import (
    SUPPORTED,
    References,
    claims_of,
    passed_over_steps,
    read_completion,
    trace_claims,
    unverified_steps,
)
from tag_lightning.grounding.metrics import score_answer
from tag_lightning.grounding.rewards import REWARDS, grounding_reward

LABELS = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
EYE, BROW, MOUTH = [80, 323, 416, 407], [235, 119, 345, 188], [181, 410, 334, 511]  # the paper's figure
# A detector record made for the figure (image 512x512): boxes inside the figure's, so each IoU is an area ratio.
DETECTOR = {
    "AU7": {"box": [80, 323, 248, 407]},  # the left half of the eye box: IoU 1/2
    "AU4": {"box": BROW},  # IoU 1
    "AU14": {"box": [181, 410, 334, 460]},  # the top 50 of the mouth box's 101 rows: IoU 50/101
    "AU17": {"box": [181, 460, 334, 511]},  # the bottom 51 rows: IoU 51/101
    "AU9": {"box": [250, 200, 330, 300]},
}
SAD_FACE = References("sadness", LABELS, DETECTOR, frozenset(DETECTOR), (512, 512))


def box(values: list[int]) -> str:
    return f"<bbox>[{','.join(map(str, values))}]</bbox>"


EYE_STEP = f"Inspect eye region → heavy eyelids and drooping lower lid → {box(EYE)}"
BROW_STEP = f"Inspect inner brow → subtle lift and tension → {box(BROW)}"
MOUTH_STEP = f"Inspect mouth region → slight downturn and skin tension → {box(MOUTH)}"


def paper_trace(*steps: str, aus: str = "AU7 + AU14 + AU4 + AU17") -> str:
    return "\n".join(["Global analysis: The face looks subdued, with heavy lids and a knitted brow.",
                      "Verification loop:", *steps,
                      f"Final conclusion: Combined {aus} indicate a dominant emotion of sadness.",
                      "<answer> sadness </answer>"])


FIGURE = paper_trace(EYE_STEP, BROW_STEP, MOUTH_STEP, aus="AU14 + AU4 + AU17")  # verbatim: the eye step is unverified
VERIFIED = paper_trace(EYE_STEP, BROW_STEP, MOUTH_STEP)  # the conclusion also names the eye's AU7


def rewards_of(text: str) -> dict[str, float]:
    completion = read_completion(text)
    return {name: reward(completion, SAD_FACE).value for name, reward in REWARDS.items()}


def test_the_figure_parses_in_the_papers_format_and_its_aus_are_matched_by_region():
    parsed = parse_trace(FIGURE, image_size=(512, 512), labels=LABELS)
    assert parsed.valid and parsed.trace_format == PAPER
    claims = claims_of(read_completion(FIGURE), SAD_FACE)
    assert [(claim.au, claim.step) for claim in claims] == [(14, 3), (4, 2), (17, 3)]  # AU14, AU17 share a box
    assert all(claim.verdict == SUPPORTED for claim in claims)
    assert [claim.iou for claim in claims] == pytest.approx([50 / 101, 1.0, 51 / 101])
    assert unverified_steps(read_completion(FIGURE).trace, claims) == (1,)


# The evidence this sad face offers: the activated AUs of sadness's prototype (AU1, AU4, AU15, AU17), AU4 and AU17.
# The figure's eye (AU7) and upper-mouth (AU14) claims are true but not that evidence: they neither pay nor cost.
EVIDENCE = 1 + 51 / 101  # AU4's box (IoU 1) and AU17's (51/101)


@pytest.mark.parametrize("text, grounding, unverified", [
    # every step verified: the evidence's boxes over its 2 AUs
    (VERIFIED, EVIDENCE / 2, 0),
    # the figure verbatim: no conclusion AU lives around the eyes, so that step is unverified and left out
    (FIGURE, EVIDENCE / 2, 1),
    # boxes of the brow and mouth swapped: matched by region name, the wrong boxes miss the evidence
    (paper_trace(EYE_STEP, BROW_STEP.replace(box(BROW), box(MOUTH)), MOUTH_STEP.replace(box(MOUTH), box(BROW))),
     0.0, 0),
    # AU9 (nose) is concluded, but no step inspects the nose: a true claim without a box, which pays nothing
    (paper_trace(EYE_STEP, BROW_STEP, MOUTH_STEP, aus="AU7 + AU14 + AU4 + AU17 + AU9"), EVIDENCE / 2, 0),
    # a step on a region no concluded AU lives in: unverified, left out
    (paper_trace(EYE_STEP, BROW_STEP, MOUTH_STEP, f"Inspect face → calm skin → {box([0, 0, 512, 512])}"),
     EVIDENCE / 2, 1),
    # a second, worse mouth box: passed over for the better one, it counts as a slot worth 0
    (paper_trace(EYE_STEP, BROW_STEP, MOUTH_STEP, f"Inspect mouth → pressed → {box([0, 0, 100, 100])}"),
     EVIDENCE / 3, 1),
])
def test_hand_made_paper_traces_score_the_hand_computed_values(text, grounding, unverified):
    completion = read_completion(text)
    assert completion.trace_format == PAPER and completion.valid
    result = grounding_reward(completion, SAD_FACE)
    assert result.value == pytest.approx(grounding) and result.parts["unverified_steps"] == unverified
    assert {name: value for name, value in rewards_of(text).items() if name != "au_f1"} == pytest.approx(
        {"format": 1.0, "answer": 1.0, "grounding": grounding})


def test_a_concluded_au_no_step_carries_is_a_claim_without_a_box():
    claims = claims_of(read_completion(paper_trace(EYE_STEP, BROW_STEP, MOUTH_STEP, aus="AU4 + AU9")), SAD_FACE)
    assert [claim.to_dict() for claim in claims][1] == {"step": None, "au": "AU9", "polarity": "active", "box": None,
                                                        "detector_box": [250, 200, 330, 300], "iou": 0.0,
                                                        "verdict": "supported"}


def test_mixing_the_formats_is_a_format_error():
    mixed = read_completion(VERIFIED.replace("Inspect inner brow", "Inspect inner brow (AU4)"))
    assert mixed.trace_format == PER_STEP and not mixed.valid
    assert [error[:7] for error in mixed.errors if "no AU ids" in error] == ["line 3:", "line 5:"]
    assert rewards_of(VERIFIED)["format"] == 1.0 > rewards_of(mixed.text)["format"]


def test_the_answer_score_says_which_format_it_was_read_as():
    row = score_answer(read_completion(FIGURE), SAD_FACE).to_dict()
    assert row["trace_format"] == PAPER and row["unverified_steps"] == [1] and row["format_valid"]
    assert score_answer(read_completion("garbage"), SAD_FACE).to_dict()["trace_format"] == PER_STEP


# -- render -> parse: the paper's format gives the steps' AUs back through the claim matching -----------

_AUS_BY_REGION = {key: [au.id for au in ACTION_UNITS if au.region == key] for key in REGIONS}
_REGION_STEPS = st.lists(st.sampled_from(sorted(REGIONS)), min_size=1, max_size=5, unique=True).flatmap(
    lambda keys: st.tuples(*[st.tuples(st.just(key), st.sampled_from(_AUS_BY_REGION[key])) for key in keys]))
_SPAN = st.lists(st.integers(0, 500), min_size=2, max_size=2, unique=True).map(sorted)
_BOXES = st.builds(lambda xs, ys: (xs[0], ys[0], xs[1], ys[1]), _SPAN, _SPAN)


@settings(max_examples=100, deadline=None)
@given(_REGION_STEPS, st.data())
def test_a_paper_rendering_reads_back_as_the_per_step_trace(region_aus, data):
    """Steps naming their regions as the template teacher does; the detector's boxes are the steps' boxes."""
    steps = tuple(Step(REGIONS[key]["label"], (au,), "active", data.draw(_BOXES)) for key, au in region_aus)
    trace = Trace("A face.", steps, "It is happy.", "happiness")
    detector = {f"AU{au}": {"box": list(step.box)} for step in steps for au in step.aus}
    activated = frozenset(detector)
    parsed = parse_trace(render_trace(trace, PAPER), image_size=(500, 500), labels=LABELS)
    assert parsed.valid and parsed.trace_format == PAPER
    expected = [(claim.au, claim.box, claim.iou) for claim in trace_claims(trace, detector, activated)]
    assert [(claim.au, claim.box, claim.iou) for claim in trace_claims(parsed.trace, detector, activated)] == expected
    assert unverified_steps(parsed.trace, trace_claims(parsed.trace, detector, activated)) == ()


# -- padding never pays -----------------------------------------------------------------------------------

_NAMES = st.sampled_from(["face", "skin", "inner brow", "eyes", "mouth", "nose", "cheeks", "chin", "hairline"])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([FIGURE, VERIFIED]), _NAMES, st.lists(st.integers(0, 512), min_size=4, max_size=4),
       st.integers(0, 3))
def test_adding_an_unverified_step_never_raises_a_reward(text, region, corners, position):
    """A step inserted anywhere that ends up unverified (it wins no claim) raises no reward; one passed
    over for a better box of its region lowers the grounding reward."""
    x1, x2 = sorted(corners[:2])
    y1, y2 = sorted(corners[2:])
    lines = text.split("\n")
    padded = "\n".join(lines[:2 + position] + [f"Inspect {region} → seen → {box([x1, y1, x2, y2])}"]
                       + lines[2 + position:])
    completion = read_completion(padded)
    if 1 + position not in unverified_steps(completion.trace, claims_of(completion, SAD_FACE)):
        return  # the step won a claim: it is evidence, not padding
    before, after = rewards_of(text), rewards_of(padded)
    assert all(after[name] <= before[name] for name in REWARDS), (before, after)
    assert after["grounding"] <= before["grounding"]
    if 1 + position in passed_over_steps(completion.trace, claims_of(completion, SAD_FACE)):
        assert after["grounding"] < before["grounding"]
