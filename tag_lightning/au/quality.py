"""Face image quality check (TAG's data-construction step 2): sharpness, face size, detection score.

A failing image is not dropped: its record keeps status ``low_quality`` with the reason and the
measured figures, so a later run with other thresholds can decide differently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from tag_lightning.boxes import Box

# Sharpness is measured on the face crop resized to this height, so that the figure compares
# faces of different resolutions (a 48x48 FERPlus face and a 4000 px portrait).
SHARPNESS_CROP_HEIGHT = 128


@dataclass(frozen=True)
class QualityThresholds:
    min_sharpness: float = 20.0  # variance of the Laplacian on the normalised face crop
    min_face_size: float = 32.0  # shorter side of the face box, original pixels
    min_detection_score: float = 0.5  # mediapipe face detector score

    def as_dict(self) -> dict:
        return asdict(self)


def face_sharpness(rgb: np.ndarray, face_box: Box) -> float:
    """Variance of the Laplacian of the grey face crop (higher = sharper)."""
    x1, y1, x2, y2 = (int(round(v)) for v in face_box)
    crop = rgb[max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)]
    if crop.size == 0:
        return 0.0
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    width = max(1, round(grey.shape[1] * SHARPNESS_CROP_HEIGHT / grey.shape[0]))
    grey = cv2.resize(grey, (width, SHARPNESS_CROP_HEIGHT), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def assess_quality(
    rgb: np.ndarray, face_box: Box, detection_score: float | None, scale: float, thresholds: QualityThresholds
) -> tuple[dict, str | None]:
    """Quality figures and the reason the face fails (None when it passes).

    `face_box` is in the pixels of `rgb`; `scale` maps them to the original image's pixels.
    """
    size = min(face_box[2] - face_box[0], face_box[3] - face_box[1]) * scale
    figures = {
        "sharpness": round(face_sharpness(rgb, face_box), 3),
        "face_size": round(size, 1),
        "detection_score": None if detection_score is None else round(detection_score, 4),
    }
    reasons = []
    if figures["sharpness"] < thresholds.min_sharpness:
        reasons.append(f"blurry face (sharpness {figures['sharpness']:.1f} < {thresholds.min_sharpness})")
    if size < thresholds.min_face_size:
        reasons.append(f"small face ({size:.0f} px < {thresholds.min_face_size:.0f} px)")
    score = detection_score if detection_score is not None else 0.0
    if score < thresholds.min_detection_score:
        reasons.append(f"weak face detection (score {score:.2f} < {thresholds.min_detection_score})")
    return figures, "; ".join(reasons) or None
