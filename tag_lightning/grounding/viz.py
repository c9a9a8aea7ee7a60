"""Draw AU boxes on a face: a record's detector boxes, and a model's answer beside the detector's.

`draw_record` serves `tag prepare au-show --draw` (original-image pixels, as in the AU records);
`draw_answer` is the overlay `tag predict` writes per image, like the right-hand panel of TAG's
pipeline figure (pixels of the image the model saw). Text is ASCII: OpenCV's Hershey fonts have
no arrows or accents.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from tag_lightning.au.record import AURecord
from tag_lightning.grounding.claims import HALLUCINATION, MISS, SUPPORTED, UNVERIFIED

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
    x, y = max(0, min(corner[0], canvas.shape[1] - w)), max(h + base, corner[1])
    while any(x < t[2] and t[0] < x + w and y - h - base < t[3] and t[1] < y for t in taken):
        y += h + base
    taken.append((x, y - h - base, x + w, y))
    cv2.rectangle(canvas, (x, y - h - base), (x + w, y), colour, -1)
    cv2.putText(canvas, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)


VERDICT_COLOURS = {SUPPORTED: (34, 160, 60), HALLUCINATION: (220, 40, 40), MISS: (245, 130, 0),
                   UNVERIFIED: (140, 140, 140)}
"""The colour of a model's box by its claims' verdict (RGB)."""
DETECTOR_COLOUR = (30, 110, 230)
_WORST_FIRST = (HALLUCINATION, MISS, UNVERIFIED, SUPPORTED)
_FONT, _FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.45
_INK, _MUTED = (20, 20, 20), (110, 110, 110)
_MARGIN, _TITLE, _LINE = 10, 26, 20


def draw_answer(
    image: np.ndarray,
    steps: Sequence[Mapping],
    claims: Sequence[Mapping],
    answer: str | None,
    label: str | None = None,
    format_errors: Sequence[str] = (),
    min_side: int = 448,
) -> np.ndarray:
    """An RGB overlay of one answer: the face twice, side by side, then the answer and its steps.

    Left, "model": each step's box, labelled with its number and AUs, coloured by the worst verdict
    of its claims (`VERDICT_COLOURS`). Right, "detector": the detector's boxes of the same AUs.
    Below: the answer (and the label when known), one line per step (``Inspect <region> (AUs) ->
    <observation>``, cut to fit, with the IoU of each of its claims) and the colour legend.

    `image` is the image the model answered about; `steps` and `claims` are as in a prediction row
    (`Step.to_dict`, `Claim.to_dict`), boxes in its pixels. A smaller image is scaled up to
    `min_side`, so that the text stays legible.
    """
    scale = max(1.0, min_side / max(image.shape[:2]))
    face = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale > 1 else image
    colours = [_step_colour([claim["verdict"] for claim in claims if claim["step"] == number])
               for number in range(1, len(steps) + 1)]
    model = face.copy()
    model_labels: list[tuple[int, int, int, int]] = []
    for number, (step, colour) in enumerate(zip(steps, colours), start=1):
        if step["box"] is not None:
            _box(model, step["box"], scale, " ".join([str(number), *(f"AU{au}" for au in step["aus"])]), colour,
                 model_labels)
    detector = face.copy()
    detector_labels: list[tuple[int, int, int, int]] = []
    for box, aus in _detector_boxes(claims).items():
        _box(detector, box, scale, "+".join(aus), DETECTOR_COLOUR, detector_labels)

    lines = _text_lines(steps, claims, colours, answer, label, format_errors)
    height, width = face.shape[:2]
    text_width = 2 * width + _MARGIN
    canvas = np.full((3 * _MARGIN + _TITLE + height + _LINE * (len(lines) + 1), text_width + 2 * _MARGIN, 3), 255,
                     np.uint8)
    for x, panel, title in ((_MARGIN, model, "model"), (2 * _MARGIN + width, detector, "detector (same AUs)")):
        _text(canvas, title, (x, _MARGIN + _TITLE - 8), _INK, 0.6)
        canvas[_MARGIN + _TITLE:_MARGIN + _TITLE + height, x:x + width] = panel
    y = 2 * _MARGIN + _TITLE + height
    for text, colour, tail in lines:
        y += _LINE
        _text(canvas, _fit(_ascii(text), text_width - _width(tail)) + tail, (_MARGIN, y), colour)
    _legend(canvas, (_MARGIN, y + _LINE))
    return canvas


def _step_colour(verdicts: Sequence[str]) -> tuple[int, int, int]:
    """The colour of the worst verdict among a step's claims (a step naming no AU claims nothing: grey)."""
    return VERDICT_COLOURS[next((verdict for verdict in _WORST_FIRST if verdict in verdicts), UNVERIFIED)]


def _detector_boxes(claims: Sequence[Mapping]) -> dict[tuple, list[str]]:
    """The detector's boxes of the claimed AUs, each with its AUs (AUs of one region share a box)."""
    boxes: dict[tuple, list[str]] = defaultdict(list)
    for claim in claims:
        if claim["detector_box"] is not None and claim["au"] not in boxes[tuple(claim["detector_box"])]:
            boxes[tuple(claim["detector_box"])].append(claim["au"])
    return boxes


def _text_lines(steps: Sequence[Mapping], claims: Sequence[Mapping], colours: Sequence[tuple], answer: str | None,
                label: str | None, format_errors: Sequence[str]) -> list[tuple[str, tuple, str]]:
    """(text, colour, tail kept whole when the text is cut) for each line under the faces."""
    said = f"answer: {answer or '(none)'}"
    lines = [(said if label is None else f"{said}   label: {label} ({'right' if answer == label else 'wrong'})",
              _INK, "")]
    for number, (step, colour) in enumerate(zip(steps, colours), start=1):
        aus = ", ".join(f"AU{au}" for au in step["aus"])
        ious = " ".join(f"{claim['iou']:.2f}" for claim in claims if claim["step"] == number)
        box = "" if step["box"] is not None else " (no box)"
        lines.append((f"{number}. Inspect {step['region']} ({aus}) -> {step['observation']}{box}", colour,
                      f"  IoU {ious}" if ious else ""))
    if not steps:
        lines.append(("no verification step", _MUTED, ""))
    if format_errors:
        more = f" (+{len(format_errors) - 1} more)" if len(format_errors) > 1 else ""
        lines.append((f"format: {format_errors[0]}", _MUTED, more))
    return lines


def _box(canvas: np.ndarray, box: Sequence[float], scale: float, text: str, colour,
         taken: list[tuple[int, int, int, int]]) -> None:
    x1, y1, x2, y2 = (round(v * scale) for v in box)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, 2)
    _label(canvas, text, (x1, y1), colour, _FONT_SCALE, 1, taken)


def _legend(canvas: np.ndarray, corner: tuple[int, int]) -> None:
    x, y = corner
    x = _text(canvas, "model boxes:", (x, y), _MUTED)
    for verdict, colour in VERDICT_COLOURS.items():
        x = _text(canvas, f"  {verdict}", (x, y), colour)
    _text(canvas, "    detector boxes", (x, y), DETECTOR_COLOUR)


def _text(canvas: np.ndarray, text: str, corner: tuple[int, int], colour, font_scale: float = _FONT_SCALE) -> int:
    """Write `text` with its baseline at `corner`; returns the x where it ends."""
    cv2.putText(canvas, text, corner, _FONT, font_scale, colour, 1, cv2.LINE_AA)
    return corner[0] + _width(text, font_scale)


def _width(text: str, font_scale: float = _FONT_SCALE) -> int:
    return cv2.getTextSize(text, _FONT, font_scale, 1)[0][0]


def _fit(text: str, width: int) -> str:
    """`text`, cut (with "...") to at most `width` pixels."""
    if _width(text) <= width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        low, high = (middle, high) if _width(text[:middle] + "...") <= width else (low, middle - 1)
    return text[:low] + "..."


_ASCII_FORMS = str.maketrans({"\u2192": "->", "\u2026": "...", "\u2018": "'", "\u2019": "'", "\u201c": '"',
                              "\u201d": '"'})


def _ascii(text: str) -> str:
    """What Hershey fonts can draw: arrows as "->", ellipses as "...", anything else outside printable
    ASCII as "?"."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text.translate(_ASCII_FORMS))
    return printable.encode("ascii", "replace").decode("ascii")


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
