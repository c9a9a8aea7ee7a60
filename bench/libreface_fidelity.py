"""How far our LibreFace path is from LibreFace 0.2.0's own, per fixture photo.

    python bench/libreface_fidelity.py

Against `tests/fixtures/libreface/` (LibreFace's landmarks, aligned faces and outputs, made by
its `make_fixture.py`), twice: with LibreFace's landmarks (the alignment and network alone) and
with ours (mediapipe Tasks FaceLandmarker: the whole path from the photo). Columns: mean landmark
displacement (px), mean absolute grey-level difference of the aligned face (both reduced 4x to
128 px), whether the 512 px aligned faces are identical, intensity difference (mean, max, on the
0-5 scale) and detections on the other side of 0.5. The intensities come from the fixture's
random-weights network, which varies less with its input than a trained one: read the aligned
face column as the weight-independent figure.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fixtures.libreface.make_fixture import compare, fixture_photo, load_fixture, random_checkpoint  # noqa: E402

from tag_lightning.au.detectors import build_libreface_net  # noqa: E402
from tag_lightning.au.landmarks import FaceLandmarkDetector  # noqa: E402
from tag_lightning.data.samples import fetch_samples  # noqa: E402


def main() -> None:
    fixture = load_fixture()
    net = build_libreface_net()
    net.load_state_dict(random_checkpoint())
    net.eval()
    header = f"{'image':22s} {'landmarks':9s} {'lm px':>6s} {'face MAD':>8s} {'identical':>9s} " \
             f"{'dI mean':>8s} {'dI max':>7s} {'flips':>5s}"
    print(header)
    totals: dict[str, list[dict]] = {"libreface": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp, FaceLandmarkDetector() as detector:
        photos = Path(tmp)
        fetch_samples(photos)
        for name, entry in fixture["images"].items():
            rgb = fixture_photo(photos, name, entry)
            for source, points in (("libreface", np.array(entry["landmarks"])), ("ours", detector.detect(rgb).points)):
                r = compare(name, entry, rgb, points, net)
                totals[source].append(r)
                print(f"{name:22s} {source:9s} {r['landmark_px']:6.2f} {r['face_mad']:8.2f} {str(r['face_identical']):>9s} "
                      f"{r['intensity_mean']:8.4f} {r['intensity_max']:7.4f} {r['detection_flips']:5d}")
    for source, results in totals.items():
        print(f"{'all':22s} {source:9s} {np.mean([r['landmark_px'] for r in results]):6.2f} "
              f"{np.mean([r['face_mad'] for r in results]):8.2f} {sum(r['face_identical'] for r in results):>7d}/{len(results)} "
              f"{np.mean([r['intensity_mean'] for r in results]):8.4f} {max(r['intensity_max'] for r in results):7.4f} "
              f"{sum(r['detection_flips'] for r in results):3d}/{12 * len(results)}")


if __name__ == "__main__":
    main()
