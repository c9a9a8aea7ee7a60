"""The prompt of the VLM teachers: the student's question plus the detector's evidence, with boxes.

The two VLM teachers (`openai_client.py`, `hf_teacher.py`) are asked the same text, built here
from the request alone: the candidate labels, the top-K activated AUs with their boxes (or, on a
calm face, the regions' boxes), never the ground-truth label, which they must find.
"""

from __future__ import annotations

from tag_lightning.answers.grammar import COORDINATE_SEPARATOR, PAPER, PER_STEP, Box
from tag_lightning.answers.prompts import user_prompt
from tag_lightning.traces.teachers import (
    TeacherRequest,
    au_keys,
    group_by_region,
    measured_aus,
)

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
            f"- {group[0].region_label} ({', '.join(au_keys(group))}): box {_box_text(group[0].box)}"
            for group in group_by_region(measured_aus(request.record))
        ]
        lines.append(f"Inspect some of these regions, name the AUs you check {where}, and copy each region's box.")
    return "\n".join(lines)


def _box_text(box: Box) -> str:
    """A box as the trace grammar writes it, so that copying it verbatim is correct."""
    return "[" + COORDINATE_SEPARATOR.join(map(str, box)) + "]"
