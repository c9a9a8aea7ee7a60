"""Image augmentation that moves every box with the pixels it names.

The boxes a model learns (trace steps) and is rewarded against (detector AU regions) must be
boxes of the image it actually sees, so they travel through albumentations (pascal_voc boxes,
clipped to the image) together with the pixels:

1. letterbox to a square `image_size` (longest side resized bilinearly, centred on black), always;
2. for training: horizontal flip, a random affine (zoom in or out, i.e. a random resized crop
   or a wider view; a shift; a small rotation) and colour jitter (pixels only).

Rotation. A box does not say where its content lies inside it, so a rotated box can only be
bounded by a rule: albumentations' default (the rotated box's corners) grows a face region by up to
half at 10 degrees. Boxes follow the face instead:

- the AU record's boxes, when its landmarks are given, are recomputed from the moved landmarks
  by the rule that made them (`au/regions.py`): exact up to rounding;
- any other box (a trace step's) is taken as the ellipse it encloses, rotated (the rotated
  ellipse's box): within a few pixels of a face region's landmarks at the rotations used.

Vanished boxes. A random draw that leaves any box with less than `min_visibility` of its area in
view is redrawn, up to `MAX_DRAWS` times, and then replaced by the plain letterbox. So no trace
step loses its box and no detector AU silently disappears; a box partly out of view is clipped.
A box that has no area inside its own image to begin with comes back as None.

Flip. Mirroring a face mirrors its anatomy: the half that was the subject's left now looks like a
subject's right. Side labels are therefore swapped with the flip, so that "left" keeps meaning
the subject's left in the image delivered: the record's AU `sides` trade their labels (each box
moved with the pixels, each intensity staying with its half of the face), and in a trace every
whole word "left"/"right" is exchanged (regions such as "left lip corner" as well as observations
and conclusions that name a side).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# albumentations asks pypi.org for a newer release when it is imported (a network call at run time,
# 2 s timeout, a warning when offline) unless this is set; a user's own setting is kept
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np

from tag_lightning.answers.grammar import Box, Step, Trace
from tag_lightning.au.regions import au_region_boxes
from tag_lightning.boxes import points_box, round_box
from tag_lightning.errors import BadValue

MAX_DRAWS = 5
"""Random draws tried per sample before falling back to the plain letterbox."""

_SIDE_WORD_RE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class AugmentOptions:
    """Random training augmentation; the geometric parts move the boxes, colour jitter does not.

    Args:
        hflip: probability of a horizontal flip (side labels are swapped with it).
        scale: zoom range; above 1 crops into the face (a random resized crop), below 1 shows a
            wider view with black borders.
        translate: largest shift, as a fraction of the image side.
        rotate: largest rotation in degrees, either way.
        brightness: colour jitter: brightness factor drawn from 1 ± brightness.
        contrast: colour jitter: contrast factor drawn from 1 ± contrast.
        saturation: colour jitter: saturation factor drawn from 1 ± saturation.
        hue: colour jitter: hue shift drawn from ± hue (a fraction of the hue circle); off by
            default, as skin hue carries little expression and the HSV round trip is the costliest part.
        min_visibility: a draw that leaves any box less than this fraction of its area in view is
            redrawn; in (0, 1].
    """

    hflip: float = 0.5
    scale: tuple[float, float] = (0.9, 1.15)
    translate: float = 0.05
    rotate: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    min_visibility: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.min_visibility <= 1.0:
            raise BadValue(f"min_visibility must lie in (0, 1], got {self.min_visibility}")
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise BadValue(f"scale must be a range (low, high) with 0 < low <= high, got {self.scale}")


@dataclass(frozen=True)
class AugmentedFace:
    """One augmented image with its boxed structures, boxes in its pixels and sides relabelled."""

    image: np.ndarray
    """(image_size, image_size, 3) uint8 RGB."""
    trace: Trace | None
    aus: dict[str, dict] | None
    """The record's AU entries (see `AURecord.aus`); AUs whose box has no area in view are dropped."""
    mirrored: bool
    landmarks: np.ndarray | None = None
    """The record's landmarks, moved with the pixels ((478, 2) float, may lie outside the image)."""


class FaceAugment:
    """Letterbox images to `image_size` squares; with `options`, augment them at random too.

    The letterbox resize is bilinear, fine for the last factor of two at most: decode larger
    images at reduced size first (JPEG draft and area averaging, `decode_image(max_side=...)`).
    """

    def __init__(self, image_size: int, options: AugmentOptions | None = None) -> None:
        if image_size < 1:
            raise BadValue(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        points = A.KeypointParams(format="xy", remove_invisible=False)
        self._letterbox = A.Compose(_letterbox(image_size), bbox_params=_bbox_params(min_visibility=0.0),
                                    keypoint_params=points)
        self._random = None
        if options is not None:
            self._random = A.Compose(
                _letterbox(image_size) + _random_transforms(options),
                bbox_params=_bbox_params(options.min_visibility),
                keypoint_params=points,
                save_applied_params=True,
            )

    def __call__(
        self,
        image: np.ndarray,
        source_size: tuple[int, int],
        rng: np.random.Generator | None = None,
        *,
        trace: Trace | None = None,
        aus: Mapping[str, dict] | None = None,
        landmarks: np.ndarray | None = None,
    ) -> AugmentedFace:
        """Augment `image` with the boxes of `trace` and `aus` and the `landmarks` the AU boxes were made
        from, given in pixels of a `source_size` (width, height) image of which `image` may be a resized copy."""
        steps = trace.steps if trace is not None else ()
        slots = _au_slots(aus) if aus is not None else []
        boxes = [step.box for step in steps] + [_slot_box(aus, slot) for slot in slots]
        pixels, moved, points, mirrored = self._apply(image, boxes, landmarks, source_size, rng)
        au_boxes = dict(zip(slots, moved[len(steps) :]))
        if points is not None:  # the AUs in view get their boxes from the moved landmarks
            exact = _landmark_boxes(points, self.image_size)
            au_boxes = {slot: None if box is None else exact[slot] for slot, box in au_boxes.items()}
        return AugmentedFace(
            image=pixels,
            trace=None if trace is None else _moved_trace(trace, moved[: len(steps)], mirrored),
            aus=None if aus is None else _moved_aus(aus, au_boxes, mirrored),
            mirrored=mirrored,
            landmarks=points,
        )

    def transform(
        self,
        image: np.ndarray,
        boxes: Sequence[Sequence[float] | None],
        source_size: tuple[int, int],
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, list[Box | None], bool]:
        """The augmented image, each box in its integer pixels (None where the input box is None
        or has no area in its image), and whether the image was mirrored."""
        pixels, moved, _, mirrored = self._apply(image, boxes, None, source_size, rng)
        return pixels, moved, mirrored

    def _apply(
        self,
        image: np.ndarray,
        boxes: Sequence[Sequence[float] | None],
        points: np.ndarray | None,
        source_size: tuple[int, int],
        rng: np.random.Generator | None,
    ) -> tuple[np.ndarray, list[Box | None], np.ndarray | None, bool]:
        """`transform`, moving `points` ((N, 2) source pixels) along."""
        height, width = image.shape[:2]
        factors = np.array([width / source_size[0], height / source_size[1]] * 2)
        bounds = np.array([width, height, width, height], dtype=float)
        kept, rows = [], []
        for index, box in enumerate(boxes):
            if box is None:
                continue
            row = np.clip(np.asarray(box, dtype=float) * factors, 0.0, bounds)
            if row[2] > row[0] and row[3] > row[1]:
                kept.append(index)
                rows.append(row)
        keypoints = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=float) * factors[:2]
        data = {"image": image, "bboxes": np.array(rows, dtype=np.float32).reshape(-1, 4), "box_ids": kept,
                "keypoints": keypoints}
        result = self._draw(data, rng or np.random.default_rng())
        moved: list[Box | None] = [None] * len(boxes)
        for index, row in zip(result["box_ids"], result["bboxes"]):
            moved[int(index)] = _pixel_box(row, self.image_size)
        mirrored = any(name == "HorizontalFlip" for name, _ in result.get("applied_transforms", ()))
        return result["image"], moved, None if points is None else np.asarray(result["keypoints"]), mirrored

    def _draw(self, data: dict, rng: np.random.Generator) -> dict:
        """A random draw that keeps every box in view, else the plain letterbox."""
        if self._random is not None:
            self._random.set_random_state(rng, random.Random(int(rng.integers(2**63))))
            for _ in range(MAX_DRAWS):
                result = self._random(**data)
                if len(result["box_ids"]) == len(data["box_ids"]):
                    return result
        return self._letterbox(**data)


@dataclass(frozen=True)
class Letterbox:
    """The letterbox of a `original_size` (width, height) image into an `image_size` square, as numbers,
    so boxes in the delivered image can be told in pixels of the original (what `tag predict` reports).

    It repeats albumentations' arithmetic: ``LongestMaxSize`` scales the content to ``round(side *
    image_size / longest side)`` pixels, and a centred ``PadIfNeeded`` puts ``int(padding / 2)``
    before it. An image decoded at reduced size first (JPEG draft) may have content one pixel
    longer or shorter, a sub-pixel difference in the delivered image.
    """

    original_size: tuple[int, int]
    image_size: int

    @property
    def content_size(self) -> tuple[int, int]:
        """(width, height) of the resized image inside the square."""
        scale = self.image_size / max(self.original_size)
        return max(1, round(self.original_size[0] * scale)), max(1, round(self.original_size[1] * scale))

    @property
    def offset(self) -> tuple[int, int]:
        """(left, top) padding before the content."""
        width, height = self.content_size
        return int((self.image_size - width) / 2), int((self.image_size - height) / 2)

    def to_image(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A box of the original image in pixels of the delivered square."""
        (sx, sy), (left, top) = self._scales(), self.offset
        return box[0] * sx + left, box[1] * sy + top, box[2] * sx + left, box[3] * sy + top

    def to_original(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A box of the delivered square in pixels of the original image, clipped to it."""
        (sx, sy), (left, top), (width, height) = self._scales(), self.offset, self.original_size
        x1, x2 = (min(max((x - left) / sx, 0.0), width) for x in (box[0], box[2]))
        y1, y2 = (min(max((y - top) / sy, 0.0), height) for y in (box[1], box[3]))
        return x1, y1, x2, y2

    def _scales(self) -> tuple[float, float]:
        """Delivered pixels per original pixel, across and down (they differ by the content's rounding)."""
        (width, height), (content_width, content_height) = self.original_size, self.content_size
        return content_width / width, content_height / height


def mirror_sides(text: str) -> str:
    """`text` with every whole word "left" and "right" exchanged, keeping its capitalisation."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        other = _OTHER_SIDE[word.lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDE_WORD_RE.sub(swap, text)


def _bbox_params(min_visibility: float) -> A.BboxParams:
    """Boxes judged once, on the final image (checking after every transform costs a third more)."""
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["box_ids"],
        clip=True,
        min_visibility=min_visibility,
        check_each_transform=False,
    )


def _letterbox(image_size: int) -> list[A.BasicTransform]:
    return [
        A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_LINEAR),
        A.PadIfNeeded(image_size, image_size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0),
    ]


def _random_transforms(options: AugmentOptions) -> list[A.BasicTransform]:
    return [
        A.HorizontalFlip(p=options.hflip),
        A.Affine(
            scale=options.scale,
            translate_percent=(-options.translate, options.translate),
            rotate=(-options.rotate, options.rotate),
            rotate_method="ellipse",  # see the module doc
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=1.0,
        ),
        A.ColorJitter(
            brightness=(1 - options.brightness, 1 + options.brightness),
            contrast=(1 - options.contrast, 1 + options.contrast),
            saturation=(1 - options.saturation, 1 + options.saturation),
            hue=(-options.hue, options.hue),
            p=1.0,
        ),
    ]


def _pixel_box(row: Sequence[float], size: int) -> Box:
    """Integer pixels of a float box inside a `size` square: rounded, at least one pixel each way."""
    x1, y1, x2, y2 = round_box(row)
    x1, y1 = min(x1, size - 1), min(y1, size - 1)
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


# -- the boxed structures ---------------------------------------------------------------------
Slot = tuple[str, str | None]
"""Where a box lives in an AU dict: (AU key, None) for the AU's box, (AU key, side) for a side's."""


def _landmark_boxes(points: np.ndarray, size: int) -> dict[Slot, Box]:
    """Every slot's box recomputed from moved landmarks as the AU pipeline makes it, in a `size` square.

    The face box is the landmarks' box in the image, as `au/landmarks.py` makes it. The keys name
    the subject's sides as the landmark indices do, like the record's slots before any relabelling.
    """
    face = np.clip(points_box(points), 0, size)
    boxes: dict[Slot, Box] = {}
    for au, region in au_region_boxes(points, tuple(face)).items():
        boxes[(f"AU{au}", None)] = _pixel_box(region.box, size)
        for side, box in (region.sides or {}).items():
            boxes[(f"AU{au}", side)] = _pixel_box(box, size)
    return boxes


def _au_slots(aus: Mapping[str, dict]) -> list[Slot]:
    sides = [(key, side) for key, entry in aus.items() for side in entry.get("sides", {})]
    return [(key, None) for key in aus] + sides


def _slot_box(aus: Mapping[str, dict], slot: Slot) -> Sequence[float]:
    key, side = slot
    return aus[key]["box"] if side is None else aus[key]["sides"][side]["box"]


def _moved_aus(aus: Mapping[str, dict], moved: dict[Slot, Box | None], mirrored: bool) -> dict[str, dict]:
    """The AU entries with moved boxes (as lists, like records), sides relabelled after a mirror."""
    result = {}
    for key, entry in aus.items():
        box = moved[(key, None)]
        if box is None:
            continue
        result[key] = {**entry, "box": list(box)}
        if "sides" in entry:
            result[key]["sides"] = {
                _OTHER_SIDE[side] if mirrored else side: {**value, "box": list(moved[(key, side)])}
                for side, value in entry["sides"].items()
                if moved[(key, side)] is not None
            }
    return result


def _moved_trace(trace: Trace, boxes: Sequence[Box | None], mirrored: bool) -> Trace:
    """The trace with moved step boxes and, after a mirror, its side words exchanged."""
    text = mirror_sides if mirrored else str
    steps = tuple(
        Step(region=text(step.region), aus=step.aus, observation=text(step.observation), box=box)
        for step, box in zip(trace.steps, boxes)
    )
    return Trace(text(trace.global_analysis), steps, text(trace.conclusion), trace.answer)
