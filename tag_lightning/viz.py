"""Draw AU boxes on a face: detector boxes (and, later, a model's predicted boxes) with labels.

Used by `tag prepare au-show --draw` and by the evaluation reports, like the right-hand panel of
TAG's pipeline figure. Coordinates are original-image pixels, as in the AU records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import cv2
import numpy as np

from tag_lightning.au.record import AURecord

# One colour per region family (RGB), so AUs that share a box share a colour.
_COLOURS = [(46, 204, 113), (231, 76, 60), (52, 152, 219), (241, 196, 15), (155, 89, 182), (26, 188, 156),
            (230, 126, 34), (236, 64, 122), (127, 140, 141), (22, 160, 133), (192, 57, 43)]


def draw_record(rgb: np.ndarray, record: AURecord, min_intensity: float = 1.0, landmarks: bool = False) -> np.ndarray:
    """A copy of `rgb` with the face box and the boxes of every AU at or above `min_intensity`.

    Bilateral AUs are drawn as their two side boxes; AUs that share boxes are labelled together
    (``AU1 2.4 + AU4 1.1``), and labels are moved down until they do not cover one another.
    """
    canvas = rgb.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    font_scale = max(0.35, max(canvas.shape[:2]) / 1400)
    if record.face_box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in record.face_box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (200, 200, 200), thickness)
    if landmarks and record.landmarks is not None:
        for x, y in record.landmarks.astype(int):
            cv2.circle(canvas, (int(x), int(y)), max(1, thickness // 2), (255, 255, 255), -1)
    by_boxes: dict[tuple, list[str]] = defaultdict(list)
    for key, entry in record.aus.items():
        value = entry.get("intensity")
        if value is not None and value >= min_intensity:
            boxes = [tuple(side["box"]) for side in entry["sides"].values()] if "sides" in entry else [tuple(entry["box"])]
            by_boxes[tuple(boxes)].append(f"{key} {value:.1f}")
    taken: list[tuple[int, int, int, int]] = []
    for index, (boxes, labels) in enumerate(sorted(by_boxes.items(), key=lambda kv: kv[0][0][1])):
        colour = _COLOURS[index % len(_COLOURS)]
        for x1, y1, x2, y2 in boxes:
            cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        _label(canvas, " + ".join(labels), (x1, y1), colour, font_scale, thickness, taken)
    return canvas


def _label(canvas: np.ndarray, text: str, corner: tuple[int, int], colour, scale: float, thickness: int,
           taken: list[tuple[int, int, int, int]]) -> None:
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x, y = corner[0], max(h + base, corner[1])
    while any(x < t[2] and t[0] < x + w and y - h - base < t[3] and t[1] < y for t in taken):
        y += h + base
    taken.append((x, y - h - base, x + w, y))
    cv2.rectangle(canvas, (x, y - h - base), (x + w, y), colour, -1)
    cv2.putText(canvas, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)


def draw_confusion_matrix(matrix: Sequence[Sequence[int]], rows: Sequence[str], columns: Sequence[str]) -> np.ndarray:
    """An RGB picture of a confusion matrix: one row per label, one column per answer, counts in the cells.

    Cells are shaded by their share of the row (white: none, dark blue: all), so classes of any
    size read the same.
    """
    cell, left, top = 84, 110, 40
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    canvas = np.full((top + cell * len(rows) + 40, left + cell * len(columns) + 20, 3), 255, np.uint8)
    for r, (name, counts) in enumerate(zip(rows, matrix)):
        total = max(1, sum(counts))
        y = top + r * cell
        cv2.putText(canvas, name, (8, y + cell // 2 + 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
        for c, count in enumerate(counts):
            x = left + c * cell
            shade = count / total
            colour = tuple(int(255 - shade * (255 - v)) for v in (31, 78, 160))
            cv2.rectangle(canvas, (x, y), (x + cell, y + cell), colour, -1)
            cv2.rectangle(canvas, (x, y), (x + cell, y + cell), (200, 200, 200), 1)
            ink = (255, 255, 255) if shade > 0.5 else (0, 0, 0)
            (w, _), _ = cv2.getTextSize(str(count), font, scale, 1)
            cv2.putText(canvas, str(count), (x + (cell - w) // 2, y + cell // 2 + 5), font, scale, ink, 1, cv2.LINE_AA)
    for c, name in enumerate(columns):  # the answers, centred above their columns
        (w, _), _ = cv2.getTextSize(name, font, scale, 1)
        cv2.putText(canvas, name, (left + c * cell + (cell - w) // 2, top - 10), font, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(canvas, "label (rows) x answer (columns)", (8, canvas.shape[0] - 14), font, scale, (90, 90, 90), 1,
                cv2.LINE_AA)
    return canvas
