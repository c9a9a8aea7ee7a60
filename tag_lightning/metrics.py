"""torchmetrics for generated traces: answer accuracy, format validity, box IoU with the detector.

The trace is parsed once per answer (`score_answer`) and the metric only accumulates sums, so it
syncs across DDP ranks by summing. The fuller faithfulness metrics (AU precision/recall,
hallucination rate) join this module with the GRPO rewards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric

from tag_lightning.au.taxonomy import AU_BY_ID
from tag_lightning.boxes import box_iou
from tag_lightning.data.traces import Trace, parse_trace


@dataclass(frozen=True)
class AnswerScore:
    """What one generated answer is worth: its label, format validity and box agreement."""

    answer: str | None
    correct: bool
    valid: bool
    box_iou: float | None  # mean IoU of the boxes of the AUs it claims vs the detector's; None: no claim to score


def claimed_box_ious(trace: Trace, detector_aus: Mapping[str, dict]) -> list[float]:
    """IoU of each (step, AU) claim's box with the detector's box of that AU (0 when the AU is unknown)."""
    ious = []
    for step in trace.steps:
        if step.box is None:
            continue
        for au in step.aus:
            entry = detector_aus.get(AU_BY_ID[au].key) if au in AU_BY_ID else None
            ious.append(0.0 if entry is None else box_iou(step.box, entry["box"]))
    return ious


def score_answer(text: str, label: str, detector_aus: Mapping[str, dict] | None, labels: Iterable[str],
                 to_image_frame=None) -> AnswerScore:
    """Parse a generated answer and score it; `to_image_frame` maps its boxes to the detector's frame."""
    parsed = parse_trace(text, labels=labels)
    trace = parsed.trace if to_image_frame is None else to_image_frame(parsed.trace)
    answer = None if trace.answer is None else trace.answer.strip().lower()
    ious = claimed_box_ious(trace, detector_aus) if detector_aus is not None else []
    return AnswerScore(answer, answer == label, parsed.valid, sum(ious) / len(ious) if ious else None)


class GroundedAnswerMetrics(Metric):
    """Accuracy, format-valid rate and mean claimed-box IoU over a stage's generated answers."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("answers", "correct", "valid", "iou_sum", "iou_count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Sequence[AnswerScore]) -> None:  # type: ignore[override]
        self.answers += len(scores)
        self.correct += sum(score.correct for score in scores)
        self.valid += sum(score.valid for score in scores)
        ious = [score.box_iou for score in scores if score.box_iou is not None]
        self.iou_sum += sum(ious)
        self.iou_count += len(ious)

    def compute(self) -> dict[str, torch.Tensor]:
        answers = self.answers.clamp(min=1)
        return {
            "acc": self.correct / answers,
            "format_valid": self.valid / answers,
            "box_iou": self.iou_sum / self.iou_count.clamp(min=1),
        }
