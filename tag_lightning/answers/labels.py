"""One label space for every FER dataset, and the tables that map each dataset's own codes into it.

Each dataset numbers its classes differently (RAF-DB's 1 is surprise, AffectNet's 1 is happy), so
the codes are translated here, once, into unified names; a class id is an index into `EMOTIONS`.
"""

from __future__ import annotations

from tag_lightning.errors import BadValue

EMOTIONS: tuple[str, ...] = (
    "neutral",
    "happiness",
    "sadness",
    "surprise",
    "fear",
    "disgust",
    "anger",
    "contempt",
)
"""The 7 basic expressions plus contempt; the position of a name is its class id."""

EMOTION_INDEX: dict[str, int] = {name: index for index, name in enumerate(EMOTIONS)}

RAFDB_LABELS: dict[int, str] = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happiness",
    5: "sadness",
    6: "anger",
    7: "neutral",
}
"""RAF-DB basic emotion codes of `EmoLabel/list_patition_label.txt` (no contempt)."""

FERPLUS_VOTE_COLUMNS: tuple[str, ...] = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
"""The vote columns of `fer2013new.csv`, in file order: 8 emotions, then "unknown" and "not a face"."""

FERPLUS_EMOTION_COLUMNS: tuple[str, ...] = FERPLUS_VOTE_COLUMNS[:8]
"""The FERPlus columns that are expressions; their headers are already unified names."""

AFFECTNET_LABELS: dict[int, str] = {
    0: "neutral",
    1: "happiness",
    2: "sadness",
    3: "surprise",
    4: "fear",
    5: "disgust",
    6: "anger",
    7: "contempt",
}
"""AffectNet `expression` codes that are expressions."""

AFFECTNET_NON_EXPRESSIONS: dict[int, str] = {8: "none", 9: "uncertain", 10: "no-face"}
"""AffectNet codes that annotate something other than an expression; such images are excluded."""


def _in_emotion_order(names: set[str]) -> tuple[str, ...]:
    return tuple(name for name in EMOTIONS if name in names)


DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "rafdb": _in_emotion_order(set(RAFDB_LABELS.values())),
    "ferplus": _in_emotion_order(set(FERPLUS_EMOTION_COLUMNS)),
    "affectnet": _in_emotion_order(set(AFFECTNET_LABELS.values())),
    "affectnet7": _in_emotion_order(set(AFFECTNET_LABELS.values()) - {"contempt"}),
}
"""The unified labels each native dataset can produce, in class-id order (RAF-DB has no contempt;
``affectnet7`` is AffectNet as the literature's 7-class figures read it, contempt left out)."""

_SYNONYMS: dict[str, str] = {
    "happy": "happiness",
    "sad": "sadness",
    "surprised": "surprise",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "disgusted": "disgust",
    "angry": "anger",
    "contemptuous": "contempt",
}


def find_label(text: object) -> str | None:
    """The unified name of an emotion written as a unified name or a common synonym ("Happy "), else None."""
    key = " ".join(str(text).split()).lower()
    return key if key in EMOTION_INDEX else _SYNONYMS.get(key)


def normalize_label(text: str) -> str:
    """`find_label`, for labels that must be valid: unknown text raises."""
    label = find_label(text)
    if label is not None:
        return label
    raise BadValue(
        f"unknown emotion label {text!r}: expected one of {', '.join(EMOTIONS)} "
        f"or a synonym ({', '.join(_SYNONYMS)})"
    )
