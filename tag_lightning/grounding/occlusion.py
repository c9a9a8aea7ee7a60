"""Evidence necessity: does an answer depend on the regions its reasoning cites?

Each test image is asked again twice: once with the regions its answer cited blurred out, once
with as many random face regions of the same sizes blurred (seeded per image). A model whose
answers rest on the regions it cites changes its answer (flips) more often in the first case.
`flip_cited - flip_random` is that difference; an answer that cites no box has nothing to occlude
and is counted apart (``no_evidence``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torchmetrics import Metric

from tag_lightning.answers.labels import EMOTION_INDEX, EMOTIONS
from tag_lightning.boxes import union_box

Box = Sequence[float]


def blur_boxes(image: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """A copy of `image` (HWC uint8) with each box replaced by a heavy Gaussian blur of itself.

    The blur's sigma is half the box's shorter side, so what was there (a wrinkle, a lip corner)
    is gone while the region's mean colour stays: the face does not gain a new, odd patch.
    """
    out = image.copy()
    height, width = image.shape[:2]
    for box in boxes:
        x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
        x2, y2 = min(width, int(round(box[2]))), min(height, int(round(box[3])))
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        sigma = max(1.0, min(x2 - x1, y2 - y1) / 2)
        out[y1:y2, x1:x2] = cv2.GaussianBlur(np.ascontiguousarray(image[y1:y2, x1:x2]), (0, 0), sigma,
                                             borderType=cv2.BORDER_REFLECT)
    return out


def random_boxes_like(boxes: Sequence[Box], face: Box, key: str, seed: int = 0) -> list[tuple[float, ...]]:
    """As many boxes as `boxes`, of the same sizes, placed uniformly at random inside `face`.

    The draw is a function of (`seed`, `key`): the same image gets the same random regions in
    every run. A box larger than the face is placed at the face's corner (and clipped by the blur).
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    placed = []
    for box in boxes:
        width, height = box[2] - box[0], box[3] - box[1]
        x1 = face[0] + rng.uniform(0, max(0.0, (face[2] - face[0]) - width))
        y1 = face[1] + rng.uniform(0, max(0.0, (face[3] - face[1]) - height))
        placed.append((x1, y1, x1 + width, y1 + height))
    return placed


def face_area(detector_aus: dict) -> tuple[float, ...] | None:
    """The region the random occlusions are drawn in: the union of the detector's AU boxes."""
    boxes = [entry["box"] for entry in detector_aus.values() if entry.get("box") is not None]
    return union_box(boxes) if boxes else None


class OcclusionFlips(Metric):
    """Per label: answers asked again, and how many flipped with cited and with random regions blurred."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("asked", "flip_cited", "flip_random"):
            self.add_state(name, default=torch.zeros(len(EMOTIONS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("no_evidence", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, labels: Sequence[str], answers: Sequence[str | None], cited: Sequence[str | None],
               random: Sequence[str | None], occluded: Sequence[bool]) -> None:  # type: ignore[override]
        """`cited`/`random`: the answers asked again with those regions blurred; `occluded`: whether the
        answer cited any box (one that did not is counted under ``no_evidence`` only)."""
        for label, answer, with_cited, with_random, had_boxes in zip(labels, answers, cited, random, occluded):
            if not had_boxes:
                self.no_evidence += 1
                continue
            index = EMOTION_INDEX[label]
            self.asked[index] += 1
            self.flip_cited[index] += with_cited != answer
            self.flip_random[index] += with_random != answer

    def compute(self) -> dict:
        def figures(asked: torch.Tensor, cited: torch.Tensor, random: torch.Tensor) -> dict:
            count = float(asked)
            flip_cited = float(cited) / count if count else 0.0
            flip_random = float(random) / count if count else 0.0
            return {"asked": int(count), "flip_cited": flip_cited, "flip_random": flip_random,
                    "difference": flip_cited - flip_random}

        per_class = {label: figures(self.asked[i], self.flip_cited[i], self.flip_random[i])
                     for i, label in enumerate(EMOTIONS) if self.asked[i] > 0}
        overall = figures(self.asked.sum(), self.flip_cited.sum(), self.flip_random.sum())
        return {**overall, "no_evidence": int(self.no_evidence), "per_class": per_class}
