"""Benchmark the AU cache: build images/s (1 and 2 workers, with and without LibreFace) and reads/s.

    python bench/au_cache.py [--images 224] [--repeats 3]

Builds over the sample photos repeated into distinct files (one trailing byte each, so every file
has its own content hash), in fresh cache folders, timing the whole `build_au_cache` call
(worker start-up included). The LibreFace network runs with random weights in the official
checkpoint format (speed does not depend on the weights). Targets (2-core machine): >= 40 img/s
blendshape AUs with 2 workers, >= 12 img/s with LibreFace, >= 10,000 records/s read.
The baseline measured in the same run is LibreFace's own per-image loop: one image at a time,
its alignment, the 512 px aligned face written to PNG and read back, one forward pass per head.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tag_lightning.au.alignment import ALIGNED_SIZE, align_face_512, network_input  # noqa: E402
from tag_lightning.au.annotator import AnnotatorConfig  # noqa: E402
from tag_lightning.au.build import build_au_cache  # noqa: E402
from tag_lightning.au.cache import AUCache  # noqa: E402
from tag_lightning.au.detectors import build_libreface_net  # noqa: E402
from tag_lightning.data.samples import SAMPLE_LABELS, fetch_samples  # noqa: E402
from tag_lightning.images import ImageRef  # noqa: E402

TARGETS = {"blendshape, 2 workers": 40.0, "libreface, 2 workers": 12.0, "reads": 10_000.0}


def make_images(root: Path, count: int) -> list[ImageRef]:
    samples = root / "samples"
    fetch_samples(samples)
    sources = [samples / name for name in SAMPLE_LABELS]
    folder = root / "images"
    folder.mkdir()
    refs = []
    for i in range(count):
        source = sources[i % len(sources)]
        path = folder / f"{i:04d}_{source.name}"
        path.write_bytes(source.read_bytes() + i.to_bytes(4, "little"))
        refs.append(ImageRef.from_path(path))
    return refs


def time_build(refs, root: Path, config: AnnotatorConfig, workers: int, repeats: int) -> float:
    rates = []
    for r in range(repeats):
        summary = build_au_cache(refs, root / f"cache_{time.perf_counter_ns()}", config, workers=workers, progress=False)
        assert summary.computed == len(refs)
        rates.append(summary.images_per_second)
    return statistics.median(rates)


def time_reads(cache_dir: Path, repeats: int) -> float:
    cache = AUCache(cache_dir)
    keys = cache.content_hashes()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(max(1, 20_000 // len(keys))):
            for key in keys:
                cache.get(key)
        rates.append(max(1, 20_000 // len(keys)) * len(keys) / (time.perf_counter() - start))
    return statistics.median(rates)


def libreface_style_baseline(refs, weights: Path, count: int) -> float:
    """LibreFace's per-image loop: align, PNG round trip of the 512 px face, one forward per head."""
    import torch
    from PIL import Image

    from tag_lightning.au.detectors import load_libreface_weights
    from tag_lightning.au.landmarks import FaceLandmarkDetector

    torch.set_num_threads(1)
    net = build_libreface_net()
    load_libreface_weights(net, weights)
    net.eval()
    with FaceLandmarkDetector() as detector:
        start = time.perf_counter()
        for ref in refs[:count]:
            image = np.asarray(Image.open(ref.path).convert("RGB"))
            face = detector.detect(image)
            if face is None:
                continue
            png = io.BytesIO()
            align_face_512(image, face.points).save(png, "PNG")
            aligned = Image.open(png).convert("RGB").resize((ALIGNED_SIZE, ALIGNED_SIZE), Image.Resampling.BILINEAR)
            batch = torch.from_numpy(network_input(np.asarray(aligned)))[None]
            with torch.inference_mode():
                for _task in ("au_recognition", "au_detection"):  # LibreFace runs the network per task
                    net(batch)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=224, help="images per build (>= 200 for the issue's figures)")
    parser.add_argument("--repeats", type=int, default=3, help="builds per configuration; the median is reported")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        refs = make_images(root, args.images)
        weights = root / "combined_resnet.pt"
        torch.manual_seed(0)
        torch.save({"model": build_libreface_net().state_dict()}, weights)
        blendshape, libreface = AnnotatorConfig(), AnnotatorConfig(libreface_weights=str(weights))

        rows = {}
        for name, config in (("blendshape", blendshape), ("libreface", libreface)):
            for workers in (1, 2):
                rows[f"{name}, {workers} worker{'s' if workers > 1 else ''}"] = time_build(
                    refs, root, config, workers, args.repeats)
        read_cache = root / "read_cache"
        build_au_cache(refs, read_cache, blendshape, workers=2, progress=False)
        rows["reads"] = time_reads(read_cache, args.repeats)
        baseline = libreface_style_baseline(refs, weights, min(64, len(refs)))

    print(f"\nAU cache benchmark: {args.images} images, median of {args.repeats} builds (worker start-up included)")
    print(f"{'configuration':28s} {'figure':>12s} {'target':>8s} {'vs target':>10s} {'vs baseline':>12s}")
    for name, value in rows.items():
        unit = "records/s" if name == "reads" else "img/s"
        target = TARGETS.get(name)
        vs_target = f"{value / target:.2f}x" if target else ""
        vs_baseline = f"{value / baseline:.2f}x" if name.startswith("libreface") else ""
        print(f"{name:28s} {value:9.1f} {unit:>9s} {target or '':>8} {vs_target:>10s} {vs_baseline:>12s}")
    print(f"{'baseline: LibreFace per-image path (1 process)':48s} {baseline:.1f} img/s")


if __name__ == "__main__":
    main()
