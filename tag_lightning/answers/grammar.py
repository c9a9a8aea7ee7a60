"""The grammar of an AU-grounded reasoning trace: one definition, rendered and parsed.

A trace is what the model writes: TAG's output format, in one of two forms. Ours (``per_step``)
names the AU ids of each step, so every box is matched to a detector AU by the text itself::

    Global analysis: <one or two sentences about the whole face>
    Verification loop:
    Inspect <region> (AU6, AU7) → <observation> → <bbox>[x1,y1,x2,y2]</bbox>
    ...
    Final conclusion: <text>
    <answer> <label> </answer>

The paper's (``paper``) writes the steps without AU ids and lists the AUs once, in the
conclusion (``Final conclusion: Combined AU14 + AU4 + AU17 indicate …``); `claims.py` matches
them to the steps. A trace is read as the paper's when it has steps, none names an AU and the
conclusion names at least one; otherwise every step must name its AUs, so mixing the two forms
is an error on each step that names none.

The renderer and the parser are built from the same tokens below, so what the model is
trained on is exactly what it is rewarded for. The parser is strict (every deviation is an
error naming its line) and total (any input gives a ParsedTrace, never an exception),
because it scores free-running model samples. Boxes are integer pixels in whatever frame
the caller uses; converting frames is another module's job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

GLOBAL_HEADER = "Global analysis:"
LOOP_HEADER = "Verification loop:"
STEP_VERB = "Inspect"
CONCLUSION_HEADER = "Final conclusion:"
ARROW = "→"
ARROWS_ACCEPTED = (ARROW, "->")  # models often write the ASCII arrow; it means the same
AU_PREFIX = "AU"
AU_SEPARATOR = ", "
BBOX_OPEN, BBOX_CLOSE = "<bbox>", "</bbox>"
COORDINATE_SEPARATOR = ","
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
PER_STEP, PAPER = "per_step", "paper"
TRACE_FORMATS = (PER_STEP, PAPER)
PAPER_CONCLUSION = "Combined {aus} indicate: {conclusion}"  # the paper's words, for a conclusion naming too few AUs
MAX_COORDINATE = 100_000  # no face image is this large: a bigger coordinate is garbage

Box = tuple[int, int, int, int]

_ARROW_RE = re.compile("|".join(map(re.escape, ARROWS_ACCEPTED)))  # no \s* around it: stays linear
_AU_GROUP_RE = re.compile(r"\(([^()]*)\)$")  # the parenthesised AU list closing a step's region
_AU_ID_RE = re.compile(re.escape(AU_PREFIX) + r"([1-9][0-9]?)")
_AU_MENTION_RE = re.compile(r"(?<![A-Za-z0-9])" + _AU_ID_RE.pattern + r"(?![0-9])")  # an AU named in prose
_BBOX_TAG_RE = re.compile(re.escape(BBOX_OPEN) + "|" + re.escape(BBOX_CLOSE))
_BBOX_RE = re.compile(re.escape(BBOX_OPEN) + r"(.*?)" + re.escape(BBOX_CLOSE))
_BOX_LIST_RE = re.compile(r"\[(.*)\]")
_COORDINATE_RE = re.compile(r"-?[0-9]+")
_MAX_COORDINATE_CHARS = 12  # longer digit strings are absurd anyway; keeps int() cheap
_ANSWER_TAG_RE = re.compile(re.escape(ANSWER_OPEN) + "|" + re.escape(ANSWER_CLOSE))
_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE))  # one line


@dataclass(frozen=True)
class Step:
    """One verification step: the region inspected, the AUs it checks, what is seen, where."""

    region: str
    aus: tuple[int, ...]
    observation: str
    box: Box | None

    def to_dict(self) -> dict[str, Any]:
        box = None if self.box is None else list(self.box)
        return {"region": self.region, "aus": list(self.aus), "observation": self.observation, "box": box}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        box = data["box"]
        return cls(
            region=data["region"],
            aus=tuple(int(au) for au in data["aus"]),
            observation=data["observation"],
            box=None if box is None else _as_box(box),
        )


@dataclass(frozen=True)
class Trace:
    """A whole reasoning trace; `answer` is None when the text commits to no single answer."""

    global_analysis: str
    steps: tuple[Step, ...]
    conclusion: str
    answer: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_analysis": self.global_analysis,
            "steps": [step.to_dict() for step in self.steps],
            "conclusion": self.conclusion,
            "answer": self.answer,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trace:
        return cls(
            global_analysis=data["global_analysis"],
            steps=tuple(Step.from_dict(step) for step in data["steps"]),
            conclusion=data["conclusion"],
            answer=data["answer"],
        )


@dataclass(frozen=True)
class ParsedTrace:
    """What the parser recovered, with every format deviation it found on the way."""

    trace: Trace
    errors: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def trace_format(self) -> str:
        return trace_format(self.trace)

    def to_dict(self) -> dict[str, Any]:
        return {"trace": self.trace.to_dict(), "errors": list(self.errors)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParsedTrace:
        return cls(trace=Trace.from_dict(data["trace"]), errors=tuple(data["errors"]))


def _as_box(values: Iterable[Any]) -> Box:
    x1, y1, x2, y2 = (int(value) for value in values)
    return x1, y1, x2, y2


# ---------------------------------------------------------------------------------------------
# Rendering


def render_trace(trace: Trace, trace_format: str = PER_STEP) -> str:
    """The exact text the model should produce for `trace` (no trailing newline), in either format.

    ``paper`` writes the steps without their AU ids and keeps a conclusion that names every AU of
    the steps (the teachers' conclusions do); any other conclusion is prefixed with the paper's
    words listing the steps' AUs in order of first mention: ``Combined AU14 + AU4 indicate: <conclusion>``.
    """
    if trace_format not in TRACE_FORMATS:
        raise ValueError(f"unknown trace format {trace_format!r}; known: {', '.join(TRACE_FORMATS)}")
    conclusion = trace.conclusion
    if trace_format == PAPER:
        step_aus = list(dict.fromkeys(au for step in trace.steps for au in step.aus))
        if not set(step_aus) <= set(conclusion_aus(trace)):
            aus = " + ".join(f"{AU_PREFIX}{au}" for au in step_aus)
            conclusion = PAPER_CONCLUSION.format(aus=aus, conclusion=conclusion)
        trace = Trace(trace.global_analysis, tuple(_without_aus(step) for step in trace.steps), conclusion,
                      trace.answer)
    lines = [
        f"{GLOBAL_HEADER} {trace.global_analysis}",
        LOOP_HEADER,
        *(_render_step(step) for step in trace.steps),
        f"{CONCLUSION_HEADER} {trace.conclusion}",
    ]
    if trace.answer is not None:
        lines.append(f"{ANSWER_OPEN} {trace.answer} {ANSWER_CLOSE}")
    return "\n".join(lines)


def _without_aus(step: Step) -> Step:
    return Step(step.region, (), step.observation, step.box)


def _render_step(step: Step) -> str:
    claim = f"{STEP_VERB} {step.region}"
    if step.aus:
        claim += " (" + AU_SEPARATOR.join(f"{AU_PREFIX}{au}" for au in step.aus) + ")"
    parts = [claim, step.observation]
    if step.box is not None:
        parts.append(BBOX_OPEN + "[" + COORDINATE_SEPARATOR.join(map(str, step.box)) + "]" + BBOX_CLOSE)
    return f" {ARROW} ".join(parts)


# ---------------------------------------------------------------------------------------------
# Parsing


class _Section(IntEnum):
    """The line kinds of a trace body, in the order they must appear."""

    GLOBAL = 0
    LOOP = 1
    STEP = 2
    CONCLUSION = 3


_SECTION_TOKENS = {
    _Section.GLOBAL: GLOBAL_HEADER,
    _Section.LOOP: LOOP_HEADER,
    _Section.STEP: STEP_VERB,
    _Section.CONCLUSION: CONCLUSION_HEADER,
}
# A token only starts its section when followed by whitespace or the end ("Inspecting" is not a step).
_SECTION_RES = {
    section: re.compile(re.escape(token) + r"(?!\S)") for section, token in _SECTION_TOKENS.items()
}


def parse_trace(
    text: object,
    image_size: tuple[int, int] | None = None,
    labels: Iterable[str] | None = None,
) -> ParsedTrace:
    """Recover as much of a trace as `text` holds and list every deviation from the grammar.

    `image_size` is (width, height): boxes must lie inside it. `labels` are the allowed
    answers, compared case-insensitively after stripping.
    """
    errors: list[str] = []
    text = _as_text(text, errors)
    first_answer_tag = _ANSWER_TAG_RE.search(text)
    body = text[: first_answer_tag.start()] if first_answer_tag else text
    global_analysis, steps, conclusion = _parse_body(body, image_size, errors)
    answer = _parse_answer(text, labels, errors)
    trace = Trace(global_analysis=global_analysis, steps=steps, conclusion=conclusion, answer=answer)
    return ParsedTrace(trace=trace, errors=tuple(errors))


def extract_answer(text: object) -> str | None:
    """The stripped content of the one `<answer>` tag of `text`; None if there is not exactly one."""
    match, _ = _locate_answer(_as_text(text, []))
    return (match.group(1).strip() or None) if match else None


def trace_aus(trace: Trace) -> set[int]:
    """Every AU the trace claims to have inspected, whether or not its box was valid."""
    if trace_format(trace) == PAPER:
        return set(conclusion_aus(trace))
    return {au for step in trace.steps for au in step.aus}


def conclusion_aus(trace: Trace) -> tuple[int, ...]:
    """The AUs the conclusion names, once each, in order (the claims of a paper-format trace)."""
    return _named_aus(trace.conclusion)


def prose_aus(trace: Trace) -> tuple[int, ...]:
    """The AUs the global analysis and the conclusion name, once each, in order of appearance."""
    return tuple(dict.fromkeys(_named_aus(trace.global_analysis) + _named_aus(trace.conclusion)))


def trace_format(trace: Trace) -> str:
    """PAPER when the trace has steps, none names an AU and the conclusion names some; else PER_STEP."""
    return _format_of(trace.steps, trace.conclusion)


def line_format(line: dict) -> str:
    """The trace format a JSONL line was written in (lines without ``trace_format`` predate the paper's: per_step)."""
    return line.get("trace_format", PER_STEP)


def _named_aus(text: str) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(number) for number in _AU_MENTION_RE.findall(text)))


def _format_of(steps: tuple[Step, ...], conclusion: str) -> str:
    paper = steps and not any(step.aus for step in steps) and _named_aus(conclusion)
    return PAPER if paper else PER_STEP


def _as_text(value: object, errors: list[str]) -> str:
    """Bytes are decoded; anything else that is not text counts as an empty trace."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    errors.append(f"expected text, got {type(value).__name__}")
    return ""


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _parse_body(
    body: str, image_size: tuple[int, int] | None, errors: list[str]
) -> tuple[str, tuple[Step, ...], str]:
    """Walk the lines before the answer: headers once each, steps in between, all in order."""
    headers: dict[_Section, str] = {}
    steps: list[Step] = []
    ungrouped: list[str] = []  # where the steps that name no AU group are
    furthest = _Section.GLOBAL
    for number, raw_line in enumerate(body.split("\n"), start=1):
        line = raw_line.strip()
        if not line:
            continue
        where = f"line {number}"
        section = _section_of(line)
        if section is None:
            errors.append(f"{where}: unexpected text {_quote(line)}")
            continue
        token = _SECTION_TOKENS[section]
        if section < furthest:
            later = _SECTION_TOKENS[furthest]
            errors.append(f"{where}: '{token}' is out of order (it must come before '{later}')")
        furthest = max(furthest, section)
        rest = line[len(token) :].strip()
        if section is _Section.STEP:
            step, grouped = _parse_step(rest, where, image_size, errors)
            steps.append(step)
            if not grouped:
                ungrouped.append(where)
            continue
        if _BBOX_TAG_RE.search(rest):
            errors.append(f"{where}: {BBOX_OPEN} outside a verification step")
        if section in headers:
            errors.append(f"{where}: duplicate '{token}'")
            continue
        headers[section] = rest
        if section is _Section.LOOP and rest:
            errors.append(f"{where}: unexpected text after '{token}': {_quote(rest)}")
        elif section is not _Section.LOOP and not rest:
            errors.append(f"{where}: '{token}' is empty")
    for section in (_Section.GLOBAL, _Section.LOOP, _Section.CONCLUSION):
        if section not in headers:
            errors.append(f"missing '{_SECTION_TOKENS[section]}' line")
    if not steps:
        errors.append(f"the verification loop has no '{STEP_VERB} …' steps")
    conclusion = headers.get(_Section.CONCLUSION, "")
    if _format_of(tuple(steps), conclusion) == PER_STEP:
        errors.extend(f"{where}: the step names no AU ids (expected e.g. '({AU_PREFIX}4)' after the region, "
                      f"or, in the paper's format, no step naming any and the conclusion listing them)"
                      for where in ungrouped)
    return headers.get(_Section.GLOBAL, ""), tuple(steps), conclusion


def _section_of(line: str) -> _Section | None:
    return next((section for section, pattern in _SECTION_RES.items() if pattern.match(line)), None)


def _parse_step(
    rest: str, where: str, image_size: tuple[int, int] | None, errors: list[str]
) -> tuple[Step, bool]:
    """Parse '<region> (AU..) → <observation> → <bbox>[x1,y1,x2,y2]</bbox>' (what follows 'Inspect'),
    the AU group being optional here (whether it may be missing depends on the whole trace); the
    bool says whether the step has one."""
    first_tag = _BBOX_TAG_RE.search(rest)
    box = _parse_step_box(rest, where, image_size, errors)
    claim = (rest[: first_tag.start()] if first_tag else rest).rstrip()
    trailing_arrow = next((arrow for arrow in ARROWS_ACCEPTED if claim.endswith(arrow)), None)
    if trailing_arrow:
        claim = claim[: -len(trailing_arrow)]
    elif first_tag:
        errors.append(f"{where}: missing '{ARROW}' before {BBOX_OPEN}")
    head, *after_arrow = _ARROW_RE.split(claim, maxsplit=1)
    observation = after_arrow[0].strip() if after_arrow else ""
    if not after_arrow:
        errors.append(f"{where}: missing the observation or the '{ARROW}' before it")
    elif _ARROW_RE.search(observation):
        errors.append(f"{where}: too many '{ARROW}' in the step (expected two)")
    elif not observation:
        errors.append(f"{where}: the step has no observation")
    head = head.strip()
    grouped = _AU_GROUP_RE.search(head) is not None
    region, aus = _parse_region(head, where, errors)
    return Step(region=region, aus=aus, observation=observation, box=box), grouped


def _parse_region(head: str, where: str, errors: list[str]) -> tuple[str, tuple[int, ...]]:
    """Split '<region> (AU6, AU7)' into the region name and its AU ids (none when there is no group)."""
    group = _AU_GROUP_RE.search(head)
    region = (head[: group.start()] if group else head).strip()
    if not region:
        errors.append(f"{where}: the step names no region")
    if group is None:
        return region, ()
    if not group.group(1).strip():
        errors.append(f"{where}: the step names no AU ids (expected e.g. '({AU_PREFIX}4)' after the region)")
        return region, ()
    aus: list[int] = []
    for item in (item.strip() for item in group.group(1).split(",")):
        au_id = _AU_ID_RE.fullmatch(item)
        if au_id is None:
            errors.append(f"{where}: malformed AU id {_quote(item)} (expected e.g. '{AU_PREFIX}4')")
        elif int(au_id.group(1)) in aus:
            errors.append(f"{where}: {item} is listed twice")
        else:
            aus.append(int(au_id.group(1)))
    return region, tuple(aus)


def _parse_step_box(
    rest: str, where: str, image_size: tuple[int, int] | None, errors: list[str]
) -> Box | None:
    """The step's one box, or None with the reason in `errors`."""
    tag_count = max(rest.count(BBOX_OPEN), rest.count(BBOX_CLOSE))
    if tag_count == 0:
        errors.append(f"{where}: the step has no {BBOX_OPEN}")
        return None
    if tag_count > 1:
        errors.append(f"{where}: the step has {tag_count} boxes, expected one")
        return None
    tag = _BBOX_RE.search(rest)
    if tag is None:
        errors.append(f"{where}: malformed box tag (expected {BBOX_OPEN}[x1,y1,x2,y2]{BBOX_CLOSE})")
        return None
    if rest[tag.end() :].strip():
        errors.append(f"{where}: unexpected text after {BBOX_CLOSE}")
    box, problem = _read_box(tag.group(1), image_size)
    if problem is not None:
        errors.append(f"{where}: malformed box {_quote(tag.group(1))}: {problem}")
    return box


def _read_box(content: str, image_size: tuple[int, int] | None) -> tuple[Box | None, str | None]:
    """'[x1,y1,x2,y2]' as a box, or None and what is wrong with it."""
    listed = _BOX_LIST_RE.fullmatch(content.strip())
    if listed is None:
        return None, "expected [x1,y1,x2,y2]"
    items = [item.strip() for item in listed.group(1).split(COORDINATE_SEPARATOR)]
    if len(items) != 4:
        return None, f"{len(items)} coordinates, expected 4"
    for item in items:
        if not _COORDINATE_RE.fullmatch(item):
            return None, f"coordinate {_quote(item)} is not an integer"
        if item.startswith("-"):
            return None, f"coordinate {_quote(item)} is negative"
        if len(item) > _MAX_COORDINATE_CHARS or int(item) > MAX_COORDINATE:
            return None, f"coordinate {_quote(item)} is absurdly large (> {MAX_COORDINATE})"
    x1, y1, x2, y2 = _as_box(items)
    if x2 <= x1 or y2 <= y1:
        return None, "needs x1 < x2 and y1 < y2 (corners swapped or box empty)"
    if image_size is not None and (x2 > image_size[0] or y2 > image_size[1]):
        return None, f"beyond the {image_size[0]}x{image_size[1]} image"
    return (x1, y1, x2, y2), None


def _locate_answer(text: str) -> tuple[re.Match[str] | None, str | None]:
    """The single '<answer> … </answer>' span on one line, or why there is none."""
    tags = list(_ANSWER_TAG_RE.finditer(text))
    if not tags:
        return None, f"missing {ANSWER_OPEN} … {ANSWER_CLOSE}"
    opens = [tag for tag in tags if tag.group() == ANSWER_OPEN]
    if len(opens) > 1 or len(tags) - len(opens) > 1:
        lines = ", ".join(str(_line_of(text, tag.start())) for tag in opens)
        return None, f"lines {lines}: {len(opens)} {ANSWER_OPEN} tags, expected exactly one"
    match = _ANSWER_RE.search(text)
    if match is None:
        where = f"line {_line_of(text, tags[0].start())}"
        return None, f"{where}: malformed answer (expected '{ANSWER_OPEN} label {ANSWER_CLOSE}' on one line)"
    return match, None


def _parse_answer(text: str, labels: Iterable[str] | None, errors: list[str]) -> str | None:
    """The answer, checked to stand alone on the last line and to be one of `labels`."""
    match, problem = _locate_answer(text)
    if problem is not None:
        errors.append(problem)
    if match is None:
        return None
    where = f"line {_line_of(text, match.start())}"
    line_start = text.rfind("\n", 0, match.start()) + 1
    if text[line_start : match.start()].strip():
        errors.append(f"{where}: {ANSWER_OPEN} must start its own line")
    trailing = text[match.end() :]
    if trailing.strip():
        first_char = match.end() + len(trailing) - len(trailing.lstrip())
        errors.append(f"line {_line_of(text, first_char)}: unexpected text after {ANSWER_CLOSE}")
    answer = match.group(1).strip()
    if not answer:
        errors.append(f"{where}: empty answer")
        return None
    if labels is not None:
        allowed = sorted({label.strip() for label in labels})
        if answer.casefold() not in {label.casefold() for label in allowed}:
            errors.append(f"{where}: answer {_quote(answer)} is not one of the labels {allowed}")
    return answer


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1
