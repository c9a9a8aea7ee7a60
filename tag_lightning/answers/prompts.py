"""The user prompt: one text for SFT and GRPO, so the policy is trained and rewarded on one task.

The format it asks for is spelled with the tokens of `grammar.py`, the grammar the targets are
rendered in and the rewards parse, so the instruction cannot drift from what is scored. It asks
for either trace format (`grammar.TRACE_FORMATS`): ours names the AU ids on every step, the
paper's names a region per step and lists the AUs once, in the conclusion.
"""

from __future__ import annotations

from collections.abc import Sequence

from tag_lightning.answers.grammar import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    ARROW,
    AU_PREFIX,
    BBOX_CLOSE,
    BBOX_OPEN,
    CONCLUSION_HEADER,
    GLOBAL_HEADER,
    LOOP_HEADER,
    PAPER,
    PER_STEP,
    STEP_VERB,
    TRACE_FORMATS,
)
from tag_lightning.errors import BadValue

_INSTRUCTION = (
    "Which facial expression does this face show? Choose one of: {labels}.\n"
    "Reason step by step and ground every step in a facial Action Unit (AU) region, boxed in "
    "pixels of this image as [x1,y1,x2,y2]. Answer in exactly this format:\n"
)
# What differs between the formats: where the AU ids go.
_STEP_CLAIM = {PER_STEP: f"<region> ({AU_PREFIX}<id>, ...)", PAPER: "<region>"}
_CONCLUSION = {
    PER_STEP: "<which AUs indicate which expression>",
    PAPER: f"Combined {AU_PREFIX}<id> + {AU_PREFIX}<id> ... indicate <which expression>",
}


def format_spec(trace_format: str = PER_STEP) -> str:
    """The answer layout the prompt spells out for `trace_format` (its step line is unique to it)."""
    if trace_format not in TRACE_FORMATS:
        raise BadValue(f"trace_format must be one of {', '.join(TRACE_FORMATS)}, got {trace_format!r}")
    return "\n".join((
        f"{GLOBAL_HEADER} <one or two sentences about the whole face>",
        LOOP_HEADER,
        f"{STEP_VERB} {_STEP_CLAIM[trace_format]} {ARROW} <what you see> {ARROW} {BBOX_OPEN}[x1,y1,x2,y2]{BBOX_CLOSE}",
        "(one such line per region you inspect)",
        f"{CONCLUSION_HEADER} {_CONCLUSION[trace_format]}",
        f"{ANSWER_OPEN} <one label> {ANSWER_CLOSE}",
    ))


def user_prompt(labels: Sequence[str], trace_format: str = PER_STEP) -> str:
    """The question asked with every face image; `labels` are the answers allowed for its dataset."""
    return _INSTRUCTION.format(labels=", ".join(labels)) + format_spec(trace_format)


def asked_format(prompt: str) -> str | None:
    """The trace format a prompt built here asks for (None: it asks for none), for a stand-in teacher."""
    return next((name for name in TRACE_FORMATS if format_spec(name) in prompt), None)
