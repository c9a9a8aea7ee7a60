"""Benchmark the FERDataModule: samples/s its training dataloader delivers from a warm AU cache.

    python bench/datamodule.py [--copies 36] [--batch-size 16] [--repeats 5]

Decode + augment + collate, no model: both stages (sft: trace targets; rl: detector AU boxes read
from the AU cache per item), 224 and 448 px images, 0 and 2 dataloader workers. The data is the
six face photos of the sample set (four 512x512, one 572x562, one 1000x667 JPEG) repeated into
distinct files (four trailing bytes each, so every file has its own content hash), their AU cache
built with `build_au_cache`, and one trace per image made from its record's AU boxes. Each figure
is the median over `--repeats` full epochs, timed after one warm-up epoch (workers started, files
and records in the OS cache). Target (2-core machine): >= 300 samples/s at 224 px with 2 workers.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tag_lightning.answers.grammar import Step, Trace  # noqa: E402
from tag_lightning.au.build import build_au_cache  # noqa: E402
from tag_lightning.au.cache import AUCache  # noqa: E402
from tag_lightning.au.record import AURecord  # noqa: E402
from tag_lightning.au.taxonomy import AU_BY_ID, REGIONS, parse_au_key  # noqa: E402
from tag_lightning.data.datamodule import FERDataModule  # noqa: E402
from tag_lightning.data.samples import NO_FACE, SAMPLE_LABELS, fetch_samples  # noqa: E402
from tag_lightning.images import ImageRef  # noqa: E402

TARGET = ("sft", 224, 2, 300.0)  # stage, image size, workers, samples/s


def make_data(root: Path, copies: int) -> tuple[Path, Path, Path]:
    """Manifest of `copies` distinct files per face photo, their AU cache, and a trace JSONL."""
    samples = root / "samples"
    fetch_samples(samples)
    faces = [name for name in SAMPLE_LABELS if name != NO_FACE]
    folder = root / "images"
    folder.mkdir()
    rows = []
    for copy in range(copies):
        for name in faces:
            path = folder / f"{copy:04d}_{name}"
            path.write_bytes((samples / name).read_bytes() + copy.to_bytes(4, "little"))
            rows.append((path.name, SAMPLE_LABELS[name] or "neutral"))
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    cache_dir = root / "au_cache"
    refs = [ImageRef.from_path(folder / name) for name, _ in rows]
    print(build_au_cache(refs, cache_dir, workers=2, progress=False).describe())
    cache = AUCache(cache_dir)
    traces = root / "traces.jsonl"
    with open(traces, "w") as handle:
        for ref, (_, label) in zip(refs, rows):
            record = cache.get_by_name(ref.name)
            line = {"image": ref.name, "label": label, "content_hash": record.content_hash}
            handle.write(json.dumps({**line, "trace_struct": record_trace(record, label).to_dict()}) + "\n")
    return manifest, cache_dir, traces


def record_trace(record: AURecord, label: str) -> Trace:
    """A plain trace citing the record's three strongest AUs with their region boxes."""
    strongest = [AU_BY_ID[parse_au_key(key)] for key, _ in record.activated(0.0)[:3]]
    steps = tuple(
        Step(REGIONS[au.region]["label"], (au.id,), au.description, tuple(record.aus[au.key]["box"]))
        for au in strongest
    )
    return Trace("A frontal face.", steps, f"These AUs indicate {label}.", label)


def samples_per_second(datamodule: FERDataModule, repeats: int) -> float:
    """Median samples/s over `repeats` epochs of the training dataloader, after a warm-up epoch."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    rates = []
    for epoch in range(repeats + 1):
        start, delivered = time.perf_counter(), 0
        for batch in loader:
            delivered += len(batch["image"])
        if epoch:
            rates.append(delivered / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=36, help="distinct files per face photo (6 photos)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per figure (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest, cache_dir, traces = make_data(Path(tmp), args.copies)
        results = {}
        for stage in ("sft", "rl"):
            for size in (224, 448):
                for workers in (0, 2):
                    datamodule = FERDataModule(
                        str(cache_dir), train_data=f"manifest:{manifest}", train_traces=str(traces), stage=stage,
                        image_size=size, batch_size=args.batch_size, num_workers=workers,
                    )
                    results[stage, size, workers] = samples_per_second(datamodule, args.repeats)
    print(f"\n{'stage':5s} {'size':>5s} {'workers':>7s} {'samples/s':>10s}")
    for (stage, size, workers), rate in results.items():
        print(f"{stage:5s} {size:5d} {workers:7d} {rate:10.1f}")
    stage, size, workers, target = TARGET
    rate = results[stage, size, workers]
    print(f"target: >= {target:.0f} samples/s ({stage}, {size} px, {workers} workers): "
          f"measured {rate:.1f}, ratio {rate / target:.2f}")


if __name__ == "__main__":
    main()
