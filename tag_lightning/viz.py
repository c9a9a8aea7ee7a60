"""Draw AU boxes on a face: detector boxes (and, later, a model's predicted boxes) with labels.

Used by `tag prepare au-show --draw` and by the evaluation reports, like the right-hand panel of
TAG's pipeline figure. Coordinates are original-image pixels, as in the AU records.
"""

from __future__ import annotations

from collections import defaultdict

import cv2
import numpy as np

from tag_lightning.au.record import AURecord

# One colour per region family (RGB), so AUs that share a box share a colour.
_COLOURS = [(46, 204, 113), (231, 76, 60), (52, 152, 219), (241, 196, 15), (155, 89, 182), (26, 188, 156),
            (230, 126, 34), (236, 64, 122), (127, 140, 141), (22, 160, 133), (192, 57, 43)]


def draw_record(rgb: np.ndarray, record: AURecord, min_intensity: float = 1.0, landmarks: bool = False) -> np.ndarray:
    """A copy of `rgb` with the face box and the box of every AU at or above `min_intensity`.

    AUs that share a region box are labelled together (``AU1 2.4 + AU4 1.1``).
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
    by_box: dict[tuple, list[str]] = defaultdict(list)
    for key, entry in record.aus.items():
        value = entry.get("intensity")
        if value is not None and value >= min_intensity:
            by_box[tuple(entry["box"])].append(f"{key} {value:.1f}")
    for index, (box, labels) in enumerate(sorted(by_box.items(), key=lambda kv: kv[0][1])):
        colour = _COLOURS[index % len(_COLOURS)]
        x1, y1, x2, y2 = box
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        _label(canvas, " + ".join(labels), (x1, y1), colour, font_scale, thickness)
    return canvas


def _label(canvas: np.ndarray, text: str, corner: tuple[int, int], colour, scale: float, thickness: int) -> None:
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x, y = corner
    y = max(h + base, y)
    cv2.rectangle(canvas, (x, y - h - base), (x + w, y), colour, -1)
    cv2.putText(canvas, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)
