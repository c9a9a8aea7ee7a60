"""FACS knowledge the rest of the package relies on: AU ids, names, descriptions, regions, prototypes.

Pure data, no models: the region each AU lives in decides which landmark box grounds it
(`au/regions.py`), and the emotion prototypes decide which AUs a teacher may cite for a label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ActionUnit:
    id: int
    name: str
    description: str
    region: str  # a key of `REGIONS` below

    @property
    def key(self) -> str:
        """The AU's name in records and traces, e.g. ``AU12``."""
        return f"AU{self.id}"


# Facial regions, top of the face to the bottom. `bilateral` regions have a left and a right box
# (the subject's left and right, which is image-right and image-left in a frontal photo).
REGIONS: dict[str, dict] = {
    "inner_brow": {"label": "inner brow", "bilateral": True},
    "outer_brow": {"label": "outer brow", "bilateral": True},
    "upper_eyelid": {"label": "upper eyelid", "bilateral": True},
    "lower_eyelid": {"label": "lower eyelid", "bilateral": True},
    "cheek": {"label": "cheek", "bilateral": True},
    "nose": {"label": "nose", "bilateral": False},
    "upper_lip": {"label": "upper lip", "bilateral": False},
    "lip_corner": {"label": "lip corner", "bilateral": True},
    "lips": {"label": "lips", "bilateral": False},
    "chin": {"label": "chin", "bilateral": False},
    "jaw": {"label": "jaw and mouth opening", "bilateral": False},
}

# The words a trace may name a region with, besides each region's label (singular, lower case:
# `regions_named` reads names the same way). VLMs name regions loosely, so a word may cover several
# regions; "mouth" covers the chin because the chin raiser (AU17) moves the lower lip, and the
# paper's figure grounds it in the mouth region.
REGION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "brow": ("inner_brow", "outer_brow"),
    "eyebrow": ("inner_brow", "outer_brow"),
    "forehead": ("inner_brow", "outer_brow"),
    "inner eyebrow": ("inner_brow",),
    "glabella": ("inner_brow",),
    "outer eyebrow": ("outer_brow",),
    "eye": ("upper_eyelid", "lower_eyelid"),
    "eyelid": ("upper_eyelid", "lower_eyelid"),
    "lid": ("upper_eyelid", "lower_eyelid"),
    "upper lid": ("upper_eyelid",),
    "lower lid": ("lower_eyelid",),
    "cheekbone": ("cheek",),
    "crow": ("cheek",),  # crow's feet: the cheek raiser's wrinkles beside the eye
    "nostril": ("nose",),
    "nasal": ("nose",),
    "nasolabial": ("upper_lip",),
    "mouth corner": ("lip_corner",),
    "dimple": ("lip_corner",),
    "lip": ("lips",),
    "mouth": ("upper_lip", "lip_corner", "lips", "jaw", "chin"),
}

ACTION_UNITS: tuple[ActionUnit, ...] = (
    ActionUnit(1, "inner brow raiser", "raises the inner ends of the eyebrows", "inner_brow"),
    ActionUnit(2, "outer brow raiser", "raises the outer ends of the eyebrows", "outer_brow"),
    ActionUnit(4, "brow lowerer", "lowers and draws the brows together, wrinkling the glabella", "inner_brow"),
    ActionUnit(5, "upper lid raiser", "widens the eye by raising the upper eyelid", "upper_eyelid"),
    ActionUnit(6, "cheek raiser", "lifts the cheeks and gathers skin around the eye (crow's feet)", "cheek"),
    ActionUnit(7, "lid tightener", "tightens the eyelids, narrowing the eye opening", "lower_eyelid"),
    ActionUnit(9, "nose wrinkler", "wrinkles the skin along the sides and bridge of the nose", "nose"),
    ActionUnit(10, "upper lip raiser", "raises the upper lip, deepening the nasolabial furrow", "upper_lip"),
    ActionUnit(12, "lip corner puller", "pulls the lip corners up and back, as in a smile", "lip_corner"),
    ActionUnit(14, "dimpler", "tightens the lip corners inward, forming dimples", "lip_corner"),
    ActionUnit(15, "lip corner depressor", "pulls the lip corners down", "lip_corner"),
    ActionUnit(17, "chin raiser", "pushes the chin boss and lower lip upward", "chin"),
    ActionUnit(20, "lip stretcher", "stretches the lips horizontally", "lip_corner"),
    ActionUnit(23, "lip tightener", "tightens and narrows the red of the lips", "lips"),
    ActionUnit(24, "lip pressor", "presses the lips together", "lips"),
    ActionUnit(25, "lips part", "parts the lips", "lips"),
    ActionUnit(26, "jaw drop", "lowers the jaw so the mouth opens", "jaw"),
)

AU_BY_ID: dict[int, ActionUnit] = {au.id: au for au in ACTION_UNITS}
AU_IDS: tuple[int, ...] = tuple(au.id for au in ACTION_UNITS)

# EMFACS prototypes (TAG.md): the AUs whose activation supports each expression.
# Contempt is unilateral in FACS (AU12 + AU14 on one side); the side is not encoded here.
EMOTION_PROTOTYPES: dict[str, tuple[int, ...]] = {
    "happiness": (6, 12),
    "sadness": (1, 4, 15, 17),
    "surprise": (1, 2, 5, 26),
    "fear": (1, 2, 4, 5, 7, 20, 26),
    "anger": (4, 5, 7, 23),
    "disgust": (9, 15, 10),
    "contempt": (12, 14),
    "neutral": (),
}


def parse_au_key(key: str) -> int:
    """``"AU12"`` -> 12; raises ValueError for anything that is not a known AU."""
    text = key.strip().upper()
    if not text.startswith("AU") or not text[2:].isdigit() or int(text[2:]) not in AU_BY_ID:
        raise ValueError(f"unknown action unit {key!r}; known: {', '.join(a.key for a in ACTION_UNITS)}")
    return int(text[2:])


_REGION_VOCABULARY: dict[str, frozenset[str]] = {
    **{region["label"]: frozenset({key}) for key, region in REGIONS.items()},
    **{word: frozenset(regions) for word, regions in REGION_SYNONYMS.items()},
}
_WORD_RE = re.compile(r"[a-z]+")


def _words(name: str) -> str:
    """Lower-case words, plurals made singular ("Lip corners" -> "lip corner"), one space apart."""
    words = (word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word
             for word in _WORD_RE.findall(name.casefold()))
    return " ".join(words)


def regions_named(name: str) -> frozenset[str]:
    """The keys of `REGIONS` a free-text region name refers to ("inner brows", "eye region", "mouth").

    Each phrase of the vocabulary (region labels and `REGION_SYNONYMS`) found as whole words counts,
    the longest first, so "upper lip" names the upper lip and not also the lips.
    """
    text, found = f" {_words(name)} ", set()
    for phrase in sorted(_REGION_VOCABULARY, key=len, reverse=True):
        if f" {_words(phrase)} " in text:
            found |= _REGION_VOCABULARY[phrase]
            text = text.replace(f" {_words(phrase)} ", "  ")
    return frozenset(found)
