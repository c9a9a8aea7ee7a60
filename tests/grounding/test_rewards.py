"""The claim rule and the GRPO rewards: values on real traces and records, and totality on any string."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tag_lightning.answers.grammar import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    ARROW,
    BBOX_CLOSE,
    BBOX_OPEN,
    CONCLUSION_HEADER,
    GLOBAL_HEADER,
    LOOP_HEADER,
    STEP_VERB,
    Step,
    render_trace,
)
from tag_lightning.au.cache import AUCache
from tag_lightning.data.datamodule import load_traces
from tag_lightning.grounding import rewards
from tag_lightning.grounding.claims import HALLUCINATION, SUPPORTED, References, claims_of, read_completion
from tag_lightning.grounding.rewards import REWARDS, RewardResult, check_weights, score
from tag_lightning.models.backbones.base import Frame
from tag_lightning.traces.template import TemplateTeacher

LABELS = ("surprise", "happiness", "anger", "disgust", "neutral")
WEIGHTS = {"format": 0.5, "answer": 1.0, "grounding": 1.0}


@pytest.fixture(scope="module")
def samples(demo_dir):
    """(record, kept SFT target trace) of every labelled sample photo the template teacher kept."""
    cache = AUCache(demo_dir / "au_cache")
    return [(cache.get(digest), trace) for digest, traces in load_traces(demo_dir / "traces.jsonl").items()
            for trace in traces]


def references_of(record, label: str) -> References:
    """What the datamodule hands the rewards for an un-augmented image: its record's AUs and activations."""
    activated = frozenset(key for key, _ in record.activated(1.0))
    return References(label, LABELS, record.aus, activated, record.size)


def test_the_sft_target_trace_earns_full_format_and_answer_and_near_full_grounding(samples):
    assert len(samples) == 4
    for record, trace in samples:
        references = references_of(record, trace.answer)
        frame = Frame(record.size, (224, 224))  # the tiny model's frame: another scale on each axis
        text = render_trace(frame.trace_to_model(trace))  # what SFT teaches the model to write
        completion = read_completion(text, frame.trace_to_original)
        total, results = score(completion, references, WEIGHTS)
        assert results["format"].value == 1.0, completion.errors
        assert results["answer"].value == 1.0
        assert results["grounding"].value >= 0.9
        assert results["grounding"].parts["hallucinations"] == 0 and results["grounding"].parts["claims"] >= 1
        assert total == pytest.approx(0.5 + 1.0 + results["grounding"].value)


def test_a_trace_citing_an_au_the_detector_does_not_see_is_a_hallucination(samples):
    record, trace = samples[0]
    silent = next(key for key, entry in record.aus.items() if entry["intensity"] < 0.2)
    step = Step("somewhere", (int(silent[2:]),), "clearly active", tuple(record.aus[silent]["box"]))
    completion = read_completion(render_trace(replace(trace, steps=trace.steps + (step,))))
    references = references_of(record, trace.answer)
    claims = claims_of(completion, references)
    assert [claim.verdict for claim in claims].count(HALLUCINATION) == 1
    result = rewards.grounding_reward(completion, references)
    assert result.parts["hallucinations"] == 1
    (wrong,) = [claim for claim in claims if claim.verdict == HALLUCINATION]
    assert wrong.iou == pytest.approx(1.0)  # the box is right, the claim is not
    clean = rewards.grounding_reward(read_completion(render_trace(trace)), references)
    evidence = clean.parts["evidence"]
    assert result.value == pytest.approx(clean.value * evidence / (evidence + 1))  # one more slot, worth 0


def test_a_neutral_trace_inspecting_an_activated_au_is_a_miss(samples):
    record, _ = samples[0]
    neutral = TemplateTeacher().write(record, "neutral")
    references = references_of(record, "neutral")
    honest = claims_of(read_completion(render_trace(neutral)), references)
    assert honest and all(claim.verdict == SUPPORTED for claim in honest)
    active_key, _ = record.activated(1.0)[0]
    step = Step("region", (int(active_key[2:]),), "relaxed", tuple(record.aus[active_key]["box"]))
    completion = read_completion(render_trace(replace(neutral, steps=neutral.steps + (step,))))
    result = rewards.grounding_reward(completion, references)
    assert result.parts["misses"] == 1 and result.parts["hallucinations"] == 0
    assert rewards.answer_reward(completion, references).value == 1.0


@pytest.mark.parametrize("text, expected", [
    ("", {"format": 0.0, "answer": 0.0, "grounding": 0.0}),
    ("I think this person is happy.", {"format": 0.0, "answer": 0.0, "grounding": 0.0}),
    ("<answer> Happy </answer>", {"format": 0.25, "answer": 1.0, "grounding": 0.0}),  # a synonym; no steps
    (f"{STEP_VERB} mouth (AU12) {ARROW} up {ARROW} {BBOX_OPEN}[10,10,5000,20]{BBOX_CLOSE}\n{ANSWER_OPEN} anger {ANSWER_CLOSE}",
     {"format": 0.5, "answer": 0.0, "grounding": 0.0}),  # a step whose box leaves the image, in a broken answer
    # the paper's format: the lip corner step grounds AU12 (IoU 400/800); the face step is unverified, left out
    ("\n".join([f"{GLOBAL_HEADER} x", LOOP_HEADER,
                f"{STEP_VERB} lip corners {ARROW} up {ARROW} {BBOX_OPEN}[10,10,90,20]{BBOX_CLOSE}",
                f"{STEP_VERB} face {ARROW} calm {ARROW} {BBOX_OPEN}[0,0,9,9]{BBOX_CLOSE}",
                f"{CONCLUSION_HEADER} Combined AU12 indicate joy", f"{ANSWER_OPEN} happiness {ANSWER_CLOSE}"]),
     {"format": 1.0, "answer": 1.0, "grounding": 0.5}),
])
def test_hand_made_answers(text, expected):
    references = References("happiness", LABELS, {"AU12": {"box": [10, 10, 50, 20]}}, frozenset({"AU12"}), (100, 100))
    completion = read_completion(text)
    assert {name: REWARDS[name](completion, references).value for name in expected} == pytest.approx(expected)


def test_reward_weights_are_checked_and_a_new_reward_is_one_function_and_one_entry(monkeypatch):
    with pytest.raises(ValueError, match="unknown reward.*'accuracy'.*known rewards: format, answer, grounding"):
        check_weights({"format": 0.5, "accuracy": 1.0})
    with pytest.raises(ValueError, match="finite"):
        check_weights({"format": float("nan")})

    def brevity(completion, references):
        return RewardResult(1.0 / (1 + len(completion.text)), {"characters": float(len(completion.text))})

    monkeypatch.setitem(REWARDS, "brevity", brevity)
    references = References("happiness", LABELS, {}, frozenset(), (100, 100))
    total, results = score(read_completion("abc"), references, check_weights({"brevity": 2.0}))
    assert total == pytest.approx(0.5) and results["brevity"].parts == {"characters": 3.0}


# -- totality: any string in, a finite result out ---------------------------------------------

_GRAMMAR = [GLOBAL_HEADER, LOOP_HEADER, STEP_VERB, CONCLUSION_HEADER, ARROW, "->", "(AU6, AU12)", "(AU99)", "(AU",
            "Combined AU12 + AU6 indicate", "lip corners", BBOX_OPEN, BBOX_CLOSE, "[", "]", ",", ANSWER_OPEN,
            ANSWER_CLOSE, "happiness", "neutral", "Angry", "\n", " ", "eye region", "-1", "0", "99999999999999999999", "1e9"]
_numbers = st.integers(min_value=-10**30, max_value=10**30).map(str)
_soup = st.lists(st.one_of(st.sampled_from(_GRAMMAR), _numbers, st.text(max_size=5)), max_size=60).map("".join)
_box = st.tuples(*[st.integers(min_value=-10**12, max_value=10**12)] * 4).map(
    lambda b: f"{BBOX_OPEN}[{','.join(map(str, b))}]{BBOX_CLOSE}")
_step = st.tuples(st.text(max_size=8), st.lists(st.integers(-5, 120), max_size=4), _box).map(
    lambda s: f"{STEP_VERB} {s[0]} ({', '.join(f'AU{a}' for a in s[1])}) {ARROW} seen {ARROW} {s[2]}")
_near_valid = st.tuples(st.lists(_step, max_size=4), st.sampled_from(LABELS + ("", "joy", "Happy"))).map(
    lambda t: "\n".join([f"{GLOBAL_HEADER} x", LOOP_HEADER, *t[0], f"{CONCLUSION_HEADER} y",
                         f"{ANSWER_OPEN} {t[1]} {ANSWER_CLOSE}"]))
# The paper's format: steps without AU ids naming regions (known, synonyms, unknown), the AUs in the conclusion.
_paper_step = st.tuples(st.sampled_from(["lip corners", "cheeks", "eye region", "mouth", "face", ""]), _box).map(
    lambda s: f"{STEP_VERB} {s[0]} {ARROW} seen {ARROW} {s[1]}")
_near_valid_paper = st.tuples(st.lists(_paper_step, max_size=4), st.lists(st.integers(-5, 120), max_size=4),
                              st.sampled_from(LABELS + ("", "Happy"))).map(
    lambda t: "\n".join([f"{GLOBAL_HEADER} x", LOOP_HEADER, *t[0],
                         f"{CONCLUSION_HEADER} Combined {' + '.join(f'AU{a}' for a in t[1])} indicate y",
                         f"{ANSWER_OPEN} {t[2]} {ANSWER_CLOSE}"]))
_REFERENCES = [
    References("happiness", LABELS, {"AU12": {"box": [10, 10, 50, 20]}, "AU6": {"box": [0, 0, 1, 1]}},
               frozenset({"AU12"}), (100, 100)),
    References("neutral", LABELS, {}, frozenset(), (1, 1)),
]


def _check_total(text) -> None:
    for references in _REFERENCES:
        for frame in (None, Frame((640, 480), (224, 168)).trace_to_original):
            completion = read_completion(text, frame)
            total, results = score(completion, references, WEIGHTS)
            assert math.isfinite(total)
            for result in results.values():
                assert 0.0 <= result.value <= 1.0
                assert all(math.isfinite(value) for value in result.parts.values())


@pytest.mark.slow
@settings(max_examples=4000, deadline=None)
@given(st.text())
def test_rewards_never_raise_on_arbitrary_unicode(text):
    _check_total(text)


@pytest.mark.slow
@settings(max_examples=4000, deadline=None)
@given(_soup)
def test_rewards_never_raise_on_grammar_soup_and_absurd_numbers(text):
    _check_total(text)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(st.one_of(_near_valid, _near_valid_paper))
def test_rewards_never_raise_on_near_valid_traces(text):
    """Both trace formats."""
    _check_total(text)


@pytest.mark.parametrize("value", [None, 3, b"\xff<answer> anger </answer>", ["a"]])
def test_rewards_take_values_that_are_not_text(value):
    _check_total(value)


def test_an_answer_the_grammar_rejects_earns_no_grounding_reward(samples):
    """The hack GRPO found in the demo's experiment: the hallucinated step's words moved into the
    conclusion, after which the grammar fails and the steps left claim only what the detector sees."""
    record, trace = samples[0]
    references = references_of(record, trace.answer)
    grounded = read_completion(render_trace(trace))
    assert grounded.valid and rewards.grounding_reward(grounded, references).value > 0.9
    hidden = render_trace(trace).replace("Final conclusion:", "Final conclusion: widened eyes <bbox>[1,1,9,9]</bbox>\n"
                                         "Final conclusion:")
    broken = read_completion(hidden)
    assert not broken.valid and claims_of(broken, references) == claims_of(grounded, references)
    result = rewards.grounding_reward(broken, references)
    assert result.value == 0.0 and result.parts["readable"] == 0.0
