"""One claim rule for the trace filter, the rewards and the metrics: an AU asserted anywhere is checked, they
agree on every fuzzed trace, dropping true evidence never raises the grounding reward, and Facial-R1's AU-F1."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tag_lightning.answers.grammar import Step, Trace, render_trace
from tag_lightning.au.cache import AUCache
from tag_lightning.au.taxonomy import ACTION_UNITS
from tag_lightning.data.datamodule import load_traces
from tag_lightning.grounding.claims import HALLUCINATION, SUPPORTED, References, claims_of, read_completion
from tag_lightning.grounding.metrics import AnswerMetrics, score_answer
from tag_lightning.grounding.rewards import au_f1_reward, grounding_reward
from tag_lightning.traces.builder import grounding_errors

LABELS = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")


@pytest.fixture(scope="module")
def face(demo_dir):
    """The happy sample photo's AU record and its SFT target trace (template teacher, grounded)."""
    cache = AUCache(demo_dir / "au_cache")
    for digest, traces in load_traces(demo_dir / "traces.jsonl").items():
        if traces[0].answer == "happiness":
            return cache.get(digest), traces[0]
    raise AssertionError("no happiness trace in the demo")


def references(record, label: str = "happiness") -> References:
    return References(label, LABELS, record.aus, frozenset(key for key, _ in record.activated(1.0)), record.size)


def silent_au(record) -> int:
    """An AU the detector measured on the face but does not activate."""
    return next(int(key[2:]) for key, entry in record.aus.items() if entry["intensity"] < 0.5)


def test_an_inactive_au_named_only_in_the_conclusion_is_a_hallucination_for_filter_rewards_and_metrics(face):
    record, trace = face
    au = silent_au(record)
    asserted = replace(trace, conclusion=f"{trace.conclusion} AU{au} as well.")
    completion, refs = read_completion(render_trace(asserted)), references(record)
    (claim,) = [claim for claim in claims_of(completion, refs) if claim.step is None and claim.au == au]
    assert claim.verdict == HALLUCINATION and claim.box is None
    assert any(f"AU{au} is not activated" in error for error in grounding_errors(asserted, record, 1.0, 0.1))
    clean = grounding_reward(read_completion(render_trace(trace)), refs)
    result = grounding_reward(completion, refs)
    assert result.parts["hallucinations"] == 1 and result.value < clean.value
    score = score_answer(completion, refs)
    assert score.hallucinates and not score_answer(read_completion(render_trace(trace)), refs).hallucinates
    metrics = AnswerMetrics()
    metrics.update([score])
    assert metrics.compute()["hallucination_rate"] == 1.0


KNOWN = [unit.id for unit in ACTION_UNITS]


@st.composite
def fuzzed_answers(draw, record):
    """A per-step answer over the face: steps citing measured or unmeasured AUs with right, shifted or no-overlap
    boxes, AUs named in the prose too, an emotion or neutral answer."""
    measured = sorted(int(key[2:]) for key in record.aus)
    steps = []
    for _ in range(draw(st.integers(0, 4))):
        aus = tuple(draw(st.lists(st.sampled_from(measured + KNOWN[:3]), min_size=1, max_size=2, unique=True)))
        entry = record.aus.get(f"AU{aus[0]}")
        shift = draw(st.sampled_from([0, 10, 400]))
        box = (0, 0, 20, 20) if entry is None else tuple(int(v) + shift for v in entry["box"])
        steps.append(Step(f"region {len(steps)}", aus, "seen", box))
    prose = draw(st.lists(st.sampled_from(measured + KNOWN[:3]), max_size=2))
    answer = draw(st.sampled_from(["happiness", "neutral", "anger"]))
    named = " + ".join(f"AU{au}" for step in steps for au in step.aus)
    return Trace(f"The face {' '.join(f'(AU{au})' for au in prose)}.", tuple(steps),
                 f"{named} indicate {answer}.", answer)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_filter_the_rewards_and_the_metrics_agree_on_every_fuzzed_trace(face, data):
    record, _ = face
    trace = data.draw(fuzzed_answers(record))
    completion, refs = read_completion(render_trace(trace)), references(record, trace.answer)
    claims = claims_of(completion, refs)
    hallucinated = {claim.au for claim in claims if claim.verdict == HALLUCINATION}
    reward = grounding_reward(completion, refs)
    score = score_answer(completion, refs)
    assert reward.parts["hallucinations"] == len([c for c in claims if c.verdict == HALLUCINATION])
    assert score.hallucinates == bool(hallucinated)
    errors = " ".join(grounding_errors(trace, record, 1.0, 0.0))
    for au in hallucinated:  # the filter rejects every claim the rewards and metrics call hallucinated
        assert f"AU{au} " in errors, (au, errors)
    if all(claim.verdict == SUPPORTED for claim in claims) and completion.valid:
        assert not any(word in errors for word in ("not activated", "relaxed, but", "not measured"))
    claimed_active = {f"AU{claim.au}" for claim in claims if claim.polarity == "active"}
    assert score.claimed_active == claimed_active
    if refs.activated:
        assert reward.parts["au_recall"] == pytest.approx(len(claimed_active & refs.activated) / len(refs.activated))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_dropping_supported_evidence_never_raises_the_grounding_reward(face, data):
    """Any answer; any step all of whose claims the detector backs, removed (with its AUs from the conclusion):
    the grounding reward does not rise."""
    record, _ = face
    trace = data.draw(fuzzed_answers(record))
    refs = references(record, trace.answer)
    before = grounding_reward(read_completion(render_trace(trace)), refs).value
    claims = claims_of(read_completion(render_trace(trace)), refs)
    for number in range(1, len(trace.steps) + 1):
        if not all(claim.verdict == SUPPORTED for claim in claims if claim.step == number):
            continue
        kept = trace.steps[: number - 1] + trace.steps[number:]
        named = " + ".join(f"AU{au}" for step in kept for au in step.aus)
        dropped = replace(trace, steps=kept, conclusion=f"{named} indicate {trace.answer}.")
        assert grounding_reward(read_completion(render_trace(dropped)), refs).value <= before + 1e-12


def test_citing_fewer_true_aus_no_longer_pays(face):
    """The review's case: two supported AUs, one with a looser box (the paper's mean: 0.768, and 1.0 once the
    loose one is dropped). Now dropping it lowers the reward."""
    record, trace = face
    refs = references(record)
    assert len(trace.steps) >= 2
    loose = trace.steps[1]
    x1, y1, x2, y2 = loose.box
    looser = replace(trace, steps=(trace.steps[0], replace(loose, box=(x1, y1, x2 + (x2 - x1), y2))) + trace.steps[2:])
    dropped = replace(trace, steps=(trace.steps[0],) + trace.steps[2:])
    both = grounding_reward(read_completion(render_trace(looser)), refs).value
    one = grounding_reward(read_completion(render_trace(dropped)), refs).value
    assert one < both


def test_au_f1_is_facial_r1_s_2_f1_minus_1_against_a_hand_count():
    detector = {f"AU{au}": {"box": [10, 10, 20, 20]} for au in (4, 6, 12, 25)}
    face = References("happiness", LABELS, detector, frozenset({"AU6", "AU12", "AU25"}), (100, 100))

    def answer(*aus: int, label: str = "happiness") -> float:
        steps = "\n".join(f"Inspect spot (AU{au}) → seen → <bbox>[10,10,20,20]</bbox>" for au in aus)
        text = f"Global analysis: A face.\nVerification loop:\n{steps}\nFinal conclusion: done.\n<answer> {label} </answer>"
        return au_f1_reward(read_completion(text), face).value

    # claimed {6, 12, 4} against activated {6, 12, 25}: precision 2/3, recall 2/3, F1 2/3 -> 2 x 2/3 - 1
    assert answer(6, 12, 4) == pytest.approx(1 / 3)
    assert answer(6, 12, 25) == pytest.approx(1.0)
    assert answer(6) == pytest.approx(2 * (2 * 1 * (1 / 3) / (1 + 1 / 3)) - 1)  # precision 1, recall 1/3: F1 1/2
    assert answer(4) == -1.0 and answer() == -1.0
    nothing = References("neutral", LABELS, detector, frozenset(), (100, 100))
    assert au_f1_reward(read_completion("no answer at all"), nothing).value == 1.0  # both empty
