"""The user prompt: one text for SFT and GRPO, so the policy is trained and rewarded on one task.

The format it asks for is spelled with the tokens of `traces.py`, the grammar the targets are
rendered in and the rewards parse, so the instruction cannot drift from what is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

from tag_lightning.data.traces import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    ARROW,
    AU_PREFIX,
    BBOX_CLOSE,
    BBOX_OPEN,
    CONCLUSION_HEADER,
    GLOBAL_HEADER,
    LOOP_HEADER,
    STEP_VERB,
)

_INSTRUCTION = (
    "Which facial expression does this face show? Choose one of: {labels}.\n"
    "Reason step by step and ground every step in a facial Action Unit (AU) region, boxed in "
    "pixels of this image as [x1,y1,x2,y2]. Answer in exactly this format:\n"
)
_FORMAT = "\n".join(
    (
        f"{GLOBAL_HEADER} <one or two sentences about the whole face>",
        LOOP_HEADER,
        (
            f"{STEP_VERB} <region> ({AU_PREFIX}<id>, ...) {ARROW} <what you see> {ARROW} "
            f"{BBOX_OPEN}[x1,y1,x2,y2]{BBOX_CLOSE}"
        ),
        "(one such line per region you inspect)",
        f"{CONCLUSION_HEADER} <which AUs indicate which expression>",
        f"{ANSWER_OPEN} <one label> {ANSWER_CLOSE}",
    )
)


def user_prompt(labels: Sequence[str]) -> str:
    """The question asked with every face image; `labels` are the answers allowed for its dataset."""
    return _INSTRUCTION.format(labels=", ".join(labels)) + _FORMAT
