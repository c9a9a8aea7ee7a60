"""Builders of tiny FER datasets in their exact native formats, shared by the data tests.

Each fixture returns a function that writes a dataset under a root folder and returns that root,
so a test states only the rows it cares about. AffectNet's builder lives in `helpers.py`: the model
tests evaluate on AffectNet too.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import build_affectnet, write_face

FERPLUS_VOTES_HEADER = (
    "Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
    "contempt", "unknown", "NF",
)
HAPPY_VOTES = (0, 10, 0, 0, 0, 0, 0, 0, 0, 0)


def build_rafdb(
    root: Path,
    rows: Sequence[tuple[str, int | str]] = (("train_00001.jpg", 5), ("train_00002.jpg", 4), ("test_0001.jpg", 7)),
    *,
    without_image: Sequence[str] = (),
) -> Path:
    """``EmoLabel/list_patition_label.txt`` with `rows` (name, code), and every listed image in both
    ``Image/aligned`` (as ``<stem>_aligned.jpg``) and ``Image/original``, except `without_image`."""
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    label_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.write_text("".join(f"{name} {code}\n" for name, code in rows))
    for seed, (name, _) in enumerate(rows):
        if name not in without_image:
            write_face(root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg", seed=seed)
            write_face(root / "Image" / "original" / name, size=(120, 90), seed=seed)
    return root


def ferplus_pixels(seed: int = 0, count: int = 48 * 48) -> str:
    """A FER2013 pixel string: space-separated integers 0..255."""
    return " ".join(map(str, np.random.default_rng(seed).integers(0, 256, size=count)))


def build_ferplus(root: Path, rows: Sequence[dict]) -> Path:
    """``fer2013.csv`` and ``fer2013new.csv`` with one line per row dict. Keys, all optional:
    ``usage`` (Training), ``votes`` (10 counts, default all happiness), ``name`` (image name,
    default ``fer%07d.png``; "" for a removed image), ``pixels`` (default a random valid string)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "fer2013.csv").open("w", newline="") as pixels_file, (root / "fer2013new.csv").open(
        "w", newline=""
    ) as votes_file:
        pixels_writer, votes_writer = csv.writer(pixels_file), csv.writer(votes_file)
        pixels_writer.writerow(("emotion", "pixels", "Usage"))
        votes_writer.writerow(FERPLUS_VOTES_HEADER)
        for index, row in enumerate(rows):
            usage = row.get("usage", "Training")
            pixels_writer.writerow((3, row.get("pixels", ferplus_pixels(index)), usage))
            votes_writer.writerow((usage, row.get("name", f"fer{index:07d}.png"), *row.get("votes", HAPPY_VOTES)))
    return root


@pytest.fixture
def make_rafdb():
    return build_rafdb


@pytest.fixture
def make_ferplus():
    return build_ferplus


@pytest.fixture
def make_affectnet():
    return build_affectnet


@pytest.fixture
def make_face():
    return write_face
