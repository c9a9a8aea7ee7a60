"""Landmark index sets of mediapipe's 478-point face mesh -> one box per facial region and per AU.

Boxes are in the pixel frame of the landmarks (the original image), padded a little so that a
region's skin, not only its outline, is inside, and clipped into the face box. Bilateral regions
get one box per side, named after the subject's own left and right: mediapipe's "left" points
(indices around 263/291/336) are the subject's left, which is image-right in a frontal photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tag_lightning.au.taxonomy import ACTION_UNITS, REGIONS
from tag_lightning.boxes import Box, clip_box, pad_box, points_box, union_box

# Per region: the subject's right and left side (bilateral regions) or one index set.
REGION_LANDMARKS: dict[str, dict[str, tuple[int, ...]]] = {
    "inner_brow": {
        "right": (107, 66, 105, 55, 65, 52, 193, 9),
        "left": (336, 296, 334, 285, 295, 282, 417, 9),
    },
    "outer_brow": {
        "right": (70, 63, 105, 46, 53, 52, 156),
        "left": (300, 293, 334, 276, 283, 282, 383),
    },
    "upper_eyelid": {
        "right": (33, 246, 161, 160, 159, 158, 157, 173, 133, 27, 28, 29, 30, 56, 190),
        "left": (263, 466, 388, 387, 386, 385, 384, 398, 362, 257, 258, 259, 260, 286, 414),
    },
    "lower_eyelid": {
        "right": (33, 7, 163, 144, 145, 153, 154, 155, 133, 110, 24, 23, 22, 26, 112),
        "left": (263, 249, 390, 373, 374, 380, 381, 382, 362, 339, 254, 253, 252, 256, 341),
    },
    "cheek": {
        "right": (116, 117, 118, 119, 100, 36, 205, 187, 123, 50, 101),
        "left": (345, 346, 347, 348, 329, 266, 425, 411, 352, 280, 330),
    },
    "nose": {"center": (168, 6, 197, 195, 5, 4, 1, 2, 98, 327, 48, 278, 64, 294, 129, 358)},
    "upper_lip": {"center": (0, 37, 39, 40, 185, 61, 267, 269, 270, 409, 291, 164, 92, 322, 13, 82, 312)},
    "lip_corner": {
        "right": (61, 146, 91, 185, 40, 57, 43, 106, 186, 92, 76, 62, 78, 212, 202, 216),
        "left": (291, 375, 321, 409, 270, 287, 273, 335, 410, 322, 306, 292, 308, 432, 422, 436),
    },
    "lips": {"center": (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409)},
    "chin": {"center": (17, 18, 200, 199, 175, 152, 148, 176, 149, 377, 400, 378, 83, 313, 201, 421, 208, 428, 32, 262)},
    "jaw": {"center": (13, 14, 78, 308, 61, 291, 17, 0, 84, 314, 18, 200, 199, 175, 152, 148, 377)},
}

# Padding around each landmark set, as a fraction of the face box's larger side.
PAD_FRACTION = 0.03


@dataclass(frozen=True)
class RegionBox:
    """A region's box and, for bilateral regions, the box of each side (subject's left/right)."""

    box: Box
    sides: dict[str, Box] | None = None


def region_boxes(points: np.ndarray, face_box: Box) -> dict[str, RegionBox]:
    """Every region's box for one face's (478, 2) landmarks."""
    pad = PAD_FRACTION * max(face_box[2] - face_box[0], face_box[3] - face_box[1])
    boxes = {}
    for region, sides in REGION_LANDMARKS.items():
        side_boxes = {
            side: clip_box(pad_box(points_box(points[list(indices)]), pad), face_box)
            for side, indices in sides.items()
        }
        if REGIONS[region]["bilateral"]:
            boxes[region] = RegionBox(union_box(list(side_boxes.values())), side_boxes)
        else:
            boxes[region] = RegionBox(side_boxes["center"])
    return boxes


def au_region_boxes(points: np.ndarray, face_box: Box) -> dict[int, RegionBox]:
    """Every taxonomy AU's grounding box: the box of the region it lives in."""
    regions = region_boxes(points, face_box)
    return {au.id: regions[au.region] for au in ACTION_UNITS}
