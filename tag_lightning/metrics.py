"""torchmetrics for generated traces: answer accuracy, format validity, box IoU with the detector.

The answer is parsed once (`claims.read_completion`), scored once (`score_answer`, with the claim
rule the GRPO rewards use), and the metric only accumulates sums, so it syncs across DDP ranks by
summing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric

from tag_lightning.claims import Completion, References, claims_of


@dataclass(frozen=True)
class AnswerScore:
    """What one generated answer is worth: its label, format validity and box agreement."""

    answer: str | None
    correct: bool
    valid: bool
    box_iou: float | None  # mean IoU of its claims' boxes with the detector's (`claims.py`); None: no claim


def score_answer(completion: Completion, references: References) -> AnswerScore:
    """Score a parsed answer against its label and the detector (the claim rule of `claims.py`)."""
    claims = claims_of(completion, references)
    valid = completion.valid and completion.answer in references.labels
    return AnswerScore(completion.answer, completion.answer == references.label, valid,
                       sum(claim.iou for claim in claims) / len(claims) if claims else None)


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
