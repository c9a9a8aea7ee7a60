"""Axis-aligned boxes ``[x1, y1, x2, y2]`` in pixels: the one representation every module shares."""

from __future__ import annotations

from typing import Sequence

import numpy as np

Box = tuple[float, float, float, float]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union (0 for empty or degenerate boxes)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def points_box(points: np.ndarray) -> Box:
    """Tight box around an (N, 2) array of points."""
    return (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max()))


def pad_box(box: Sequence[float], pad: float) -> Box:
    return (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)


def clip_box(box: Sequence[float], bounds: Sequence[float]) -> Box:
    """Clip `box` into `bounds` (another box)."""
    x1 = min(max(box[0], bounds[0]), bounds[2])
    y1 = min(max(box[1], bounds[1]), bounds[3])
    x2 = min(max(box[2], bounds[0]), bounds[2])
    y2 = min(max(box[3], bounds[1]), bounds[3])
    return (x1, y1, x2, y2)


def union_box(boxes: Sequence[Sequence[float]]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def round_box(box: Sequence[float]) -> list[int]:
    """Integer pixel box as written in records and traces."""
    return [int(round(v)) for v in box]
