"""The trace grammar: exact rendering, one error per deviation, and a parser that never raises."""

from __future__ import annotations

import json
import re
import string

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
    MAX_COORDINATE,
    PAPER,
    PER_STEP,
    STEP_VERB,
    ParsedTrace,
    Step,
    Trace,
    conclusion_aus,
    extract_answer,
    parse_trace,
    render_trace,
    trace_aus,
)

KNOWN_TRACE = Trace(
    global_analysis="The face looks subdued, with heavy lids and a slight frown.",
    steps=(
        Step("eye region", (6, 7), "heavy eyelids and drooping lower lid", (80, 323, 416, 407)),
        Step("inner brow", (4,), "subtle lift and tension", (235, 119, 345, 188)),
        Step("mouth region", (15,), "slight downturn and skin tension", (181, 410, 334, 511)),
    ),
    conclusion="Combined AU15 + AU4 indicate a dominant emotion of sadness.",
    answer="sadness",
)
KNOWN_LINES = [
    "Global analysis: The face looks subdued, with heavy lids and a slight frown.",
    "Verification loop:",
    "Inspect eye region (AU6, AU7) → heavy eyelids and drooping lower lid → <bbox>[80,323,416,407]</bbox>",
    "Inspect inner brow (AU4) → subtle lift and tension → <bbox>[235,119,345,188]</bbox>",
    "Inspect mouth region (AU15) → slight downturn and skin tension → <bbox>[181,410,334,511]</bbox>",
    "Final conclusion: Combined AU15 + AU4 indicate a dominant emotion of sadness.",
    "<answer> sadness </answer>",
]
KNOWN_TEXT = "\n".join(KNOWN_LINES)
# The same trace in the paper's format: no AU ids on the steps; the conclusion lacks AU6 and AU7, so the
# renderer lists the steps' AUs before it.
PAPER_LINES = [
    KNOWN_LINES[0],
    LOOP_HEADER,
    "Inspect eye region → heavy eyelids and drooping lower lid → <bbox>[80,323,416,407]</bbox>",
    "Inspect inner brow → subtle lift and tension → <bbox>[235,119,345,188]</bbox>",
    "Inspect mouth region → slight downturn and skin tension → <bbox>[181,410,334,511]</bbox>",
    "Final conclusion: Combined AU6 + AU7 + AU4 + AU15 indicate: Combined AU15 + AU4 indicate a dominant emotion"
    " of sadness.",
    "<answer> sadness </answer>",
]
SETTINGS = settings(max_examples=200, deadline=None)


def _lines(*indices: int) -> str:
    """The known text with only the given lines (0-based), in the given order."""
    return "\n".join(KNOWN_LINES[index] for index in indices)


def _edit(old: str, new: str) -> str:
    assert KNOWN_TEXT.count(old) == 1, old
    return KNOWN_TEXT.replace(old, new)


def _box_line(content: str) -> str:
    """The known text with step 2 (line 4) carrying `content` between the box tags."""
    return _edit("[235,119,345,188]", content)


# ---------------------------------------------------------------------------------------------
# The known trace


def test_render_known_trace_exactly() -> None:
    assert render_trace(KNOWN_TRACE) == KNOWN_TEXT


def test_parse_known_text() -> None:
    assert parse_trace(KNOWN_TEXT) == ParsedTrace(KNOWN_TRACE, ())
    assert parse_trace(KNOWN_TEXT).valid and parse_trace(KNOWN_TEXT).trace_format == PER_STEP


def test_render_and_parse_the_papers_format() -> None:
    text = render_trace(KNOWN_TRACE, PAPER)
    assert text == "\n".join(PAPER_LINES)
    parsed = parse_trace(text, image_size=(640, 640), labels=["sadness"])
    assert parsed.valid and parsed.trace_format == PAPER
    assert [step.aus for step in parsed.trace.steps] == [(), (), ()]
    assert conclusion_aus(parsed.trace) == (6, 7, 4, 15) and trace_aus(parsed.trace) == {4, 6, 7, 15}
    naming_all = Trace("Sad.", KNOWN_TRACE.steps, "AU4, AU6, AU7 and AU15: sadness.", "sadness")
    assert render_trace(naming_all, PAPER).split("\n")[-2] == "Final conclusion: AU4, AU6, AU7 and AU15: sadness."
    with pytest.raises(ValueError, match="unknown trace format 'xml'"):
        render_trace(KNOWN_TRACE, "xml")


@pytest.mark.parametrize("conclusion, trace_format, errors", [
    ("Combined AU14 + AU4 + AU17 indicate sadness.", PAPER, 0),
    ("AU4 indicates sadness (cf. AU17).", PAPER, 0),
    ("The face is sad.", PER_STEP, 3),  # no AUs anywhere: every step lacks its ids
    ("Combined XAU4 + AU100 indicate sadness.", PER_STEP, 3),  # not AU ids in prose
])
def test_the_format_is_read_from_the_steps_and_the_conclusion(conclusion, trace_format, errors) -> None:
    text = "\n".join(PAPER_LINES[:5] + [f"{CONCLUSION_HEADER} {conclusion}", PAPER_LINES[6]])
    parsed = parse_trace(text)
    assert parsed.trace_format == trace_format and len(parsed.errors) == errors, parsed.errors


def test_accepted_variants() -> None:
    """ASCII arrows, CRLF, blank lines, spaces inside lists and tags, label case: all fine."""
    variant = (
        KNOWN_TEXT.replace(ARROW, "->", 2)
        .replace("(AU6, AU7)", "( AU6 ,AU7 )")
        .replace("[80,323,416,407]", "[ 80, 323, 416, 407 ]")
        .replace("<answer> sadness </answer>", "\n<answer>sadness</answer>\n")
        .replace("\n", "\r\n")
    )
    parsed = parse_trace(variant, image_size=(640, 640), labels=["Sadness ", "happiness"])
    assert parsed == ParsedTrace(KNOWN_TRACE, ())


def test_bytes_are_decoded() -> None:
    assert parse_trace(KNOWN_TEXT.encode()) == ParsedTrace(KNOWN_TRACE, ())


@pytest.mark.parametrize("value", [None, 7, 1.5, ["a"], {"text": KNOWN_TEXT}, object()])
def test_non_text_is_an_empty_trace(value: object) -> None:
    parsed = parse_trace(value)
    assert not parsed.valid
    assert parsed.trace == Trace("", (), "", None)
    assert any("expected text" in error for error in parsed.errors)
    assert extract_answer(value) is None


def test_json_round_trip() -> None:
    parsed = parse_trace(_box_line("[1,x,3,4]"))
    for value in (KNOWN_TRACE, parsed):
        restored = type(value).from_dict(json.loads(json.dumps(value.to_dict())))
        assert restored == value


def test_helpers() -> None:
    assert trace_aus(KNOWN_TRACE) == {4, 6, 7, 15}
    assert extract_answer(KNOWN_TEXT) == "sadness"
    assert extract_answer("no answer here") is None
    assert extract_answer("<answer> a </answer> <answer> b </answer>") is None
    assert extract_answer("<answer>   </answer>") is None


# ---------------------------------------------------------------------------------------------
# One error per deviation, naming its line

ERROR_CASES = {
    # id: (text, parse_trace keyword arguments, fragment of the expected error, its line or None)
    "missing global analysis": (_lines(1, 2, 3, 4, 5, 6), {}, "missing 'Global analysis:'", None),
    "empty global analysis": (_edit(KNOWN_LINES[0], GLOBAL_HEADER), {}, "is empty", 1),
    "duplicate header": (_lines(0, 0, 1, 2, 3, 4, 5, 6), {}, "duplicate 'Global analysis:'", 2),
    "unexpected line": (_edit(LOOP_HEADER, "Let me think.\n" + LOOP_HEADER), {}, "unexpected text", 2),
    "missing loop header": (_lines(0, 2, 3, 4, 5, 6), {}, "missing 'Verification loop:'", None),
    "text after loop header": (_edit(LOOP_HEADER, LOOP_HEADER + " go"), {}, "after 'Verification loop:'", 2),
    "zero steps": (_lines(0, 1, 5, 6), {}, "no 'Inspect", None),
    "step without AU ids": (_edit(" (AU4)", ""), {}, "no AU ids", 4),  # the other steps name theirs: mixed
    "empty AU group": (_edit("(AU4)", "()"), {}, "no AU ids", 4),
    "malformed AU id": (_edit("(AU4)", "(au4)"), {}, "malformed AU id", 4),
    "repeated AU id": (_edit("(AU4)", "(AU4, AU4)"), {}, "listed twice", 4),
    "step without region": (_edit("Inspect inner brow", STEP_VERB), {}, "no region", 4),
    "step without observation": (_edit(" → subtle lift and tension", ""), {}, "missing the observation", 4),
    "extra arrow": (_edit("subtle lift", "subtle → lift"), {}, "too many", 4),
    "step without box": (_edit(" → <bbox>[235,119,345,188]</bbox>", ""), {}, "no <bbox>", 4),
    "two boxes in a step": (_box_line("[235,119,345,188]</bbox> <bbox>[1,2,3,4]"), {}, "2 boxes", 4),
    "unclosed box": (_edit("[235,119,345,188]</bbox>", "[235,119,345,188]"), {}, "malformed box tag", 4),
    "no arrow before box": (_edit("tension → <bbox>[235", "tension <bbox>[235"), {}, "before <bbox>", 4),
    "text after box": (_edit("345,188]</bbox>", "345,188]</bbox> ok"), {}, "after </bbox>", 4),
    "box not a list": (_box_line("235,119,345,188"), {}, "expected [x1,y1,x2,y2]", 4),
    "non-numeric box": (_box_line("[235,abc,345,188]"), {}, "not an integer", 4),
    "float box": (_box_line("[235.5,119,345,188]"), {}, "not an integer", 4),
    "three coordinates": (_box_line("[235,119,345]"), {}, "3 coordinates", 4),
    "five coordinates": (_box_line("[235,119,345,188,9]"), {}, "5 coordinates", 4),
    "negative coordinate": (_box_line("[-235,119,345,188]"), {}, "negative", 4),
    "swapped x": (_box_line("[345,119,235,188]"), {}, "swapped", 4),
    "swapped y": (_box_line("[235,188,345,119]"), {}, "swapped", 4),
    "empty box": (_box_line("[235,119,235,188]"), {}, "swapped or box empty", 4),
    "absurd coordinate": (_box_line(f"[235,119,{MAX_COORDINATE + 1},188]"), {}, "absurdly large", 4),
    "beyond the image": (KNOWN_TEXT, {"image_size": (300, 600)}, "beyond the 300x600 image", 4),
    "box outside a step": (_edit(": Combined", ": <bbox>[1,2,3,4]</bbox> Combined"), {}, "outside", 6),
    "missing conclusion": (_lines(0, 1, 2, 3, 4, 6), {}, "missing 'Final conclusion:'", None),
    "conclusion before the loop": (_lines(0, 5, 1, 2, 3, 4, 6), {}, "out of order", 3),
    "step after the conclusion": (_lines(0, 1, 2, 3, 5, 4, 6), {}, "out of order", 6),
    "missing answer": (_lines(0, 1, 2, 3, 4, 5), {}, "missing <answer>", None),
    "two answers": (KNOWN_TEXT + "\n<answer> happiness </answer>", {}, "2 <answer> tags", None),
    "unclosed answer": (_edit(ANSWER_CLOSE, ""), {}, "malformed answer", 7),
    "answer across lines": (_edit(" sadness ", "\nsadness\n"), {}, "malformed answer", 7),
    "empty answer": (_edit(" sadness ", " "), {}, "empty answer", 7),
    "answer inside the conclusion": (_edit(".\n<answer>", ". <answer>"), {}, "must start its own line", 6),
    "answer not a label": (KNOWN_TEXT, {"labels": ["happiness", "anger"]}, "not one of the labels", 7),
    "text after the answer": (KNOWN_TEXT + "\n\nHope this helps.", {}, "after </answer>", 9),
    "text after the answer tag": (KNOWN_TEXT + " !", {}, "after </answer>", 7),
}


@pytest.mark.parametrize(("text", "kwargs", "fragment", "line"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_each_deviation_is_reported(text: str, kwargs: dict, fragment: str, line: int | None) -> None:
    parsed = parse_trace(text, **kwargs)
    assert not parsed.valid
    matching = [error for error in parsed.errors if fragment in error]
    assert matching, parsed.errors
    if line is not None:
        assert any(error.startswith(f"line {line}: ") for error in matching), matching


def test_structure_survives_a_bad_step() -> None:
    """A malformed box only loses that box: the other steps, the conclusion and the answer stay."""
    parsed = parse_trace(_box_line("[235,119,-345,188]"))
    assert len(parsed.errors) == 1
    boxless = Step("inner brow", (4,), "subtle lift and tension", None)
    steps = (KNOWN_TRACE.steps[0], boxless, KNOWN_TRACE.steps[2])
    assert parsed.trace == Trace(KNOWN_TRACE.global_analysis, steps, KNOWN_TRACE.conclusion, "sadness")


# ---------------------------------------------------------------------------------------------
# Properties

# No newlines, arrows, tags or parentheses: fields that the grammar can carry verbatim.
SAFE_ALPHABET = string.ascii_letters + string.digits + " .,;:'!?"
SAFE_TEXT = st.text(alphabet=SAFE_ALPHABET, min_size=1, max_size=30).map(str.strip).filter(bool)
_SPANS = st.lists(st.integers(0, 4000), min_size=2, max_size=2, unique=True).map(sorted)
BOXES = st.builds(lambda xs, ys: (xs[0], ys[0], xs[1], ys[1]), _SPANS, _SPANS)
STEPS = st.builds(
    Step,
    region=SAFE_TEXT,
    aus=st.lists(st.integers(1, 46), min_size=1, max_size=4, unique=True).map(tuple),
    observation=SAFE_TEXT,
    box=BOXES,
)
TRACES = st.builds(
    Trace,
    global_analysis=SAFE_TEXT,
    steps=st.lists(STEPS, min_size=1, max_size=5).map(tuple),
    conclusion=SAFE_TEXT,
    answer=SAFE_TEXT,
)
GRAMMAR_TOKENS = [
    GLOBAL_HEADER, LOOP_HEADER, STEP_VERB, CONCLUSION_HEADER, ARROW, "->", BBOX_OPEN, BBOX_CLOSE,
    ANSWER_OPEN, ANSWER_CLOSE, "[1,2,3,4]", "[", "]", ",", "-5", "4.5", "9" * 30, "\n", "\r\n", " ",
    "(AU", "(AU6, AU7)", "AU4", ")", "sadness", "Combined AU14 + AU4 indicate", "eye region", "()",
]  # fmt: skip
GRAMMAR_SOUP = st.lists(
    st.one_of(st.sampled_from(GRAMMAR_TOKENS), st.text(max_size=6)), max_size=60
).map("".join)


@SETTINGS
@given(TRACES)
def test_render_then_parse_round_trips(trace: Trace) -> None:
    parsed = parse_trace(render_trace(trace), image_size=(4000, 4000), labels=[trace.answer.upper()])
    assert parsed == ParsedTrace(trace, ())
    assert Trace.from_dict(json.loads(json.dumps(trace.to_dict()))) == trace


@SETTINGS
@given(TRACES)
def test_render_then_parse_round_trips_in_the_papers_format(trace: Trace) -> None:
    """The steps come back without AU ids and the conclusion names every AU they had (`claims.py` matches
    them back to the steps; tests/test_claims.py)."""
    parsed = parse_trace(render_trace(trace, PAPER), image_size=(4000, 4000), labels=[trace.answer])
    assert parsed.valid and parsed.trace_format == PAPER, parsed.errors
    assert parsed.trace.steps == tuple(Step(s.region, (), s.observation, s.box) for s in trace.steps)
    assert {au for step in trace.steps for au in step.aus} <= set(conclusion_aus(parsed.trace))


def _check_total(text: object) -> None:
    """Never raises; a valid parse renders back to the same trace; answers agree with extract_answer."""
    parsed = parse_trace(text, image_size=(100, 100), labels=["sadness"])
    assert isinstance(parsed, ParsedTrace)
    assert all(isinstance(error, str) and error for error in parsed.errors)
    assert parsed.trace.answer == extract_answer(text)
    if parsed.valid:
        assert parse_trace(render_trace(parsed.trace, parsed.trace_format)) == parsed


@SETTINGS
@given(st.text())
def test_parse_never_raises_on_any_text(text: str) -> None:
    _check_total(text)


@SETTINGS
@given(GRAMMAR_SOUP)
def test_parse_never_raises_on_grammar_soup(text: str) -> None:
    _check_total(text)


@SETTINGS
@given(TRACES, st.sampled_from([PER_STEP, PAPER]), st.data())
def test_parse_never_raises_on_damaged_traces(trace: Trace, trace_format: str, data: st.DataObject) -> None:
    """Cut, duplicate and splice real renderings of both formats: near-misses are where parsers break."""
    text = render_trace(trace, trace_format)
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, len(text)))
    _check_total(text[:start] + data.draw(GRAMMAR_SOUP) + text[end:])


@SETTINGS
@given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.text()), st.builds(object)))
def test_parse_never_raises_on_non_text(value: object) -> None:
    _check_total(value)


_NOT_AN_INTEGER = st.text(alphabet=string.ascii_letters + " .+-_*/", max_size=10)
BAD_COORDINATES = st.one_of(
    st.integers(max_value=-1).map(str),
    st.integers(min_value=MAX_COORDINATE + 1).map(str),
    st.just("9" * 5000),  # beyond int()'s default digit limit
    st.floats().map(repr),
    _NOT_AN_INTEGER,
)


@SETTINGS
@given(BAD_COORDINATES, st.integers(0, 3))
def test_bad_coordinates_are_reported(coordinate: str, position: int) -> None:
    coordinates = ["235", "119", "345", "188"]
    coordinates[position] = coordinate
    parsed = parse_trace(_box_line("[" + ",".join(coordinates) + "]"))
    assert parsed.trace.steps[1].box is None
    assert [error for error in parsed.errors if error.startswith("line 4: malformed box")]


@SETTINGS
@given(st.tuples(*[st.integers(0, 2 * MAX_COORDINATE)] * 4))
def test_swapped_or_oversized_boxes_are_reported(box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    parsed = parse_trace(_box_line(f"[{x1},{y1},{x2},{y2}]"), image_size=(4000, 4000))
    valid = x1 < x2 <= 4000 and y1 < y2 <= 4000
    assert (parsed.trace.steps[1].box == box) is valid
    assert parsed.valid is valid
    assert not re.search(r"line [^4]", " ".join(parsed.errors))
