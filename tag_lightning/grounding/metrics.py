"""What a stage's generated answers are worth: classification figures and the faithfulness of their evidence.

Each answer is parsed once (`claims.read_completion`) and scored once (`score_answer`, with the
claim rule the GRPO rewards use). `AnswerMetrics` (one object per stage) accumulates the scores:

- classification, by torchmetrics' own classes over the 8 unified emotions plus "no answer" (an
  answer that names no emotion counts as wrong, and is counted): accuracy, mean per-class accuracy
  (``uar``, recall averaged over the classes present in the targets), macro-F1 (over the same
  classes) and the confusion matrix;
- faithfulness, over the claims of `claims.py` (see `FAITHFULNESS`), as sums, so both parts sync
  across DDP ranks by summing and 2 ranks compute what 1 does. Answers in either trace format
  (`answers/grammar.py`) are scored alike; the counts say how many were read in the paper's format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

from tag_lightning.answers.grammar import PAPER
from tag_lightning.answers.labels import EMOTION_INDEX, EMOTIONS
from tag_lightning.au.taxonomy import EMOTION_PROTOTYPES
from tag_lightning.grounding.claims import (
    ACTIVE,
    HALLUCINATION,
    NEUTRAL,
    SUPPORTED,
    Claim,
    Completion,
    References,
    claims_of,
    unverified_steps,
)
from tag_lightning.grounding.rewards import REWARDS

NO_ANSWER = "no answer"
CLASSES = (*EMOTIONS, NO_ANSWER)
"""The columns of the confusion matrix: the unified emotions, then answers that name none."""

FAITHFULNESS = {
    "format_valid": "answers that follow the TAG grammar and name one of the dataset's labels",
    "box_iou": "mean IoU of the boxes of the claims the detector backs (TAG's matched AU boxes) with its boxes",
    "box_hit": "share of the claims the detector backs whose box overlaps its box with IoU >= 0.5",
    "au_precision": "share of the AUs answers claim active that the detector activates",
    "au_recall": "share of the AUs the detector activates that the answers claim active",
    "hallucination_rate": "share of answers with at least one claimed-active AU the detector does not activate",
    "au_emotion_consistency": "share of non-neutral answers citing at least one AU of their emotion's EMFACS prototype",
}
"""Every faithfulness figure with its one-line meaning (the reports print these)."""

CLASSIFICATION = {
    "acc": "share of answers naming the label",
    "uar": "mean over the emotions present of the share of their images answered right (unweighted average recall)",
    "macro_f1": "mean over the emotions present of the F1 score",
}


@dataclass(frozen=True)
class AnswerScore:
    """Everything one generated answer contributes to the metrics and the per-image report."""

    answer: str | None  # the unified label it names; None: it names none
    label: str | None  # None: an unlabeled image (prediction only)
    valid: bool  # the grammar holds and the answer is one of the sample's labels
    claims: tuple[Claim, ...]
    activated: frozenset[str]  # the AUs the detector activates on this image
    trace_format: str  # the format the answer was read as: "per_step" or "paper"
    unverified_steps: tuple[int, ...]  # paper format: the steps no claim is matched to (1-based)

    @property
    def correct(self) -> bool | None:
        """Whether the answer names the label; None for an unlabeled image (`tag predict`)."""
        return None if self.label is None else self.answer == self.label

    @property
    def matched(self) -> tuple[Claim, ...]:
        """The boxed claims the detector backs (verdict ``supported``): TAG's matched AU boxes (an AU named only
        in prose has no box to measure).

        Box agreement is measured on these alone. A hallucinated claim's box can sit exactly on its
        AU's region; counted here, it would raise `box_iou`, so citing every region would pay and
        removing a hallucination would look like a loss of localisation. Hallucinations are
        `hallucination_rate`'s to count.
        """
        return tuple(claim for claim in self.claims if claim.verdict == SUPPORTED and claim.box is not None)

    @property
    def box_iou(self) -> float | None:
        """Mean IoU of its matched claims' boxes with the detector's; None when none is matched."""
        return sum(claim.iou for claim in self.matched) / len(self.matched) if self.matched else None

    @property
    def claimed_active(self) -> frozenset[str]:
        return frozenset(f"AU{claim.au}" for claim in self.claims if claim.polarity == ACTIVE)

    @property
    def hallucinates(self) -> bool:
        return any(claim.verdict == HALLUCINATION for claim in self.claims)

    @property
    def consistent(self) -> bool | None:
        """Whether a non-neutral answer cites an AU of its emotion's prototype; None for neutral or no answer."""
        if self.answer is None or self.answer == NEUTRAL:
            return None
        return any(claim.au in EMOTION_PROTOTYPES.get(self.answer, ()) for claim in self.claims)

    def to_dict(self) -> dict:
        return {"answer": self.answer, "label": self.label, "correct": self.correct, "format_valid": self.valid,
                "box_iou": self.box_iou, "claims": [claim.to_dict() for claim in self.claims],
                "hallucination": self.hallucinates, "au_emotion_consistent": self.consistent,
                "trace_format": self.trace_format, "unverified_steps": list(self.unverified_steps)}


def score_answer(completion: Completion, references: References) -> AnswerScore:
    """Score a parsed answer against its label and the detector (the claim rule of `claims.py`)."""
    valid = completion.valid and completion.answer in references.labels
    claims = claims_of(completion, references)
    return AnswerScore(completion.answer, references.label, valid, tuple(claims), references.activated,
                       completion.trace_format, unverified_steps(completion.trace, claims))


class FaithfulnessSums(Metric):
    """The counts behind the faithfulness figures, summed over answers (and over ranks)."""

    full_state_update = False
    COUNTS = ("answers", "paper_format", "valid", "claims", "matched", "iou_sum", "box_hits", "claimed_active", "activated",
              "agreed", "hallucinating", "non_neutral", "consistent")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.COUNTS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Sequence[AnswerScore]) -> None:  # type: ignore[override]
        for score in scores:
            self.answers += 1
            self.paper_format += score.trace_format == PAPER
            self.valid += score.valid
            self.claims += len(score.claims)
            self.matched += len(score.matched)
            self.iou_sum += sum(claim.iou for claim in score.matched)
            self.box_hits += sum(claim.iou >= 0.5 for claim in score.matched)
            self.claimed_active += len(score.claimed_active)
            self.activated += len(score.activated)
            self.agreed += len(score.claimed_active & score.activated)
            self.hallucinating += score.hallucinates
            if score.consistent is not None:
                self.non_neutral += 1
                self.consistent += score.consistent

    def compute(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.COUNTS}


def faithfulness_figures(counts: dict[str, float]) -> dict[str, float]:
    """The figures of `FAITHFULNESS` from the summed counts (0 where nothing was there to count)."""
    def share(part: str, whole: str) -> float:
        return float(counts[part]) / float(counts[whole]) if counts[whole] else 0.0

    return {
        "format_valid": share("valid", "answers"),
        "box_iou": share("iou_sum", "matched"),
        "box_hit": share("box_hits", "matched"),
        "au_precision": share("agreed", "claimed_active"),
        "au_recall": share("agreed", "activated"),
        "hallucination_rate": share("hallucinating", "answers"),
        "au_emotion_consistency": share("consistent", "non_neutral"),
    }


class AnswerMetrics(nn.Module):
    """A stage's classification and faithfulness metrics over its answers; `compute` gives every figure.

    `sync`: False computes over this process's answers only, with no collective: for answers already
    gathered onto one process (the per-dataset table of `results.py`)."""

    def __init__(self, sync: bool = True) -> None:
        super().__init__()
        options = {"num_classes": len(CLASSES), "sync_on_compute": sync}
        self.classification = MetricCollection({
            "accuracy": MulticlassAccuracy(**options, average="micro"),
            "recall": MulticlassRecall(**options, average=None),
            "f1": MulticlassF1Score(**options, average=None),
            "confusion": MulticlassConfusionMatrix(**options),
        })
        self.faithfulness = FaithfulnessSums(sync_on_compute=sync)

    def update(self, scores: Sequence[AnswerScore]) -> None:
        if not scores:
            return
        device = self.faithfulness.answers.device
        predictions = torch.tensor([CLASSES.index(score.answer or NO_ANSWER) for score in scores], device=device)
        targets = torch.tensor([EMOTION_INDEX[score.label] for score in scores], device=device)
        self.classification.update(predictions, targets)
        self.faithfulness.update(scores)

    def compute(self) -> dict:
        """Every figure (floats), ``confusion_matrix`` (rows: labels, columns: answers, over `CLASSES`) and
        ``counts`` (what the faithfulness figures are shares of, and ``paper_format``: the answers read in
        the paper's trace format)."""
        classes = self.classification.compute()
        confusion = classes["confusion"].long()
        present = confusion.sum(dim=1) > 0  # the emotions the targets hold
        counts = {name: float(value) for name, value in self.faithfulness.compute().items()}
        figures = {
            "acc": float(classes["accuracy"]),
            "uar": float(classes["recall"][present].mean()) if present.any() else 0.0,
            "macro_f1": float(classes["f1"][present].mean()) if present.any() else 0.0,
            **faithfulness_figures(counts),
        }
        counts["no_answer"] = float(confusion[:, CLASSES.index(NO_ANSWER)].sum())
        return {**figures, "confusion_matrix": confusion.tolist(), "counts": counts}

    def reset(self) -> None:
        self.classification.reset()
        self.faithfulness.reset()


class SampledAnswerMetrics(nn.Module):
    """Figures over several sampled answers per image (`VLMModule.sampled_answers`): every figure of
    `AnswerMetrics` with each sampled answer counted as one answer, and the mean of each GRPO reward
    (`rewards.reward_values`, unweighted) over the samples. Sums, so ranks sync as in `AnswerMetrics`."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = AnswerMetrics()
        # float64: ranks add their partial sums in another order than one process does
        self.rewards = nn.ModuleDict({name: MeanMetric().set_dtype(torch.float64) for name in REWARDS})

    def update(self, scores: Sequence[AnswerScore], rewards: Sequence[Mapping[str, float]]) -> None:
        self.answers.update(scores)
        for values in rewards:
            for name, value in values.items():
                self.rewards[name].update(value)

    def compute(self) -> dict:
        """``figures`` (the figures of `AnswerMetrics` and ``reward/<name>``) and ``counts``."""
        computed = self.answers.compute()
        figures = {name: value for name, value in computed.items() if isinstance(value, float)}
        figures |= {f"reward/{name}": float(metric.compute()) for name, metric in self.rewards.items()
                    if metric.update_count}
        return {"figures": figures, "counts": computed["counts"]}

    def reset(self) -> None:
        self.answers.reset()
        for metric in self.rewards.values():
            metric.reset()
