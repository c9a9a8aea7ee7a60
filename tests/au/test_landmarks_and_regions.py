"""Real mediapipe on real photos: landmarks, the face choice, and AU region geometry."""

import numpy as np

from tag_lightning.au.regions import region_boxes
from tag_lightning.data.samples import HAPPINESS, MULTI_FACE, NO_FACE, SAMPLE_LABELS, SURPRISE

FACE_PHOTOS = [name for name in SAMPLE_LABELS if name != NO_FACE]


def test_478_landmarks_inside_the_image_on_every_face_photo(sample_records):
    for name in FACE_PHOTOS:
        record = sample_records[name]
        assert record.status == "ok", (name, record.reason)
        assert record.landmarks.shape == (478, 2)
        width, height = record.size
        assert (record.landmarks[:, 0] > -5).all() and (record.landmarks[:, 0] < width + 5).all()
        assert (record.landmarks[:, 1] > -5).all() and (record.landmarks[:, 1] < height + 5).all()
        assert len(record.blendshapes) == 52


def test_face_less_photo_is_no_face(sample_records):
    record = sample_records[NO_FACE]
    assert record.status == "no_face" and record.landmarks is None and record.aus == {}


def test_multi_face_photo_takes_the_largest_face(sample_records, samples_dir, annotator):
    from tag_lightning.images import ImageRef, load_image

    record = sample_records[MULTI_FACE]
    assert record.faces_found >= 2
    rgb = load_image(ImageRef.from_path(samples_dir / MULTI_FACE))
    result = annotator.landmarks._landmarker.detect(
        __import__("mediapipe").Image(image_format=__import__("mediapipe").ImageFormat.SRGB, data=rgb)
    )
    areas = [np.ptp([p.x for p in f]) * np.ptp([p.y for p in f]) * rgb.shape[0] * rgb.shape[1] for f in result.face_landmarks]
    box = record.face_box
    assert (box[2] - box[0]) * (box[3] - box[1]) >= 0.8 * max(areas)


def _centre_y(box):
    return (box[1] + box[3]) / 2


def test_regions_are_ordered_top_to_bottom_and_inside_the_face(sample_records):
    for name in FACE_PHOTOS:
        record = sample_records[name]
        regions = region_boxes(record.landmarks, tuple(record.face_box))
        order = ["outer_brow", "upper_eyelid", "nose", "lips", "chin"]
        centres = [_centre_y(regions[r].box) for r in order]
        assert centres == sorted(centres), (name, dict(zip(order, centres)))
        assert _centre_y(regions["inner_brow"].box) < _centre_y(regions["lower_eyelid"].box)
        x1, y1, x2, y2 = record.face_box
        for region, rb in regions.items():
            bx1, by1, bx2, by2 = rb.box
            assert x1 - 1e-3 <= bx1 < bx2 <= x2 + 1e-3 and y1 - 1e-3 <= by1 < by2 <= y2 + 1e-3, (name, region)


def test_sides_are_the_subjects_left_and_right(sample_records):
    """In a frontal photo the subject's left side is on the image's right."""
    for name in (SURPRISE, HAPPINESS):
        entry = sample_records[name].aus["AU12"]
        left, right = entry["sides"]["left"]["box"], entry["sides"]["right"]["box"]
        assert (left[0] + left[2]) / 2 > (right[0] + right[2]) / 2
        assert entry["box"] == [min(left[0], right[0]), min(left[1], right[1]), max(left[2], right[2]), max(left[3], right[3])]


def test_every_taxonomy_au_has_a_box_and_a_source(sample_records):
    from tag_lightning.au.taxonomy import ACTION_UNITS

    record = sample_records[HAPPINESS]
    assert set(record.aus) == {au.key for au in ACTION_UNITS}
    for entry in record.aus.values():
        assert entry["source"] == "blendshape" and 0.0 <= entry["intensity"] <= 5.0 and len(entry["box"]) == 4


def test_restoring_signal_handlers_does_not_kill_a_process_running_mediapipe(tmp_path):
    """mediapipe's profiler sends SIGPROF to its threads; a handler 'restored' through Python
    (as Lightning's Trainer does when it finishes) must not turn those ticks into a kill."""
    import subprocess
    import sys

    code = (
        "import signal, time, numpy as np\n"
        "from tag_lightning.au.landmarks import FaceLandmarkDetector\n"
        "saved = signal.getsignal(signal.SIGPROF)\n"
        "with FaceLandmarkDetector() as detector:\n"
        "    signal.signal(signal.SIGPROF, signal.getsignal(signal.SIGPROF))  # a save-and-restore\n"
        "    start = time.time()\n"
        "    while time.time() - start < 1.5:\n"
        "        detector.detect(np.zeros((64, 64, 3), np.uint8))\n"
        "print('alive')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "alive" in result.stdout, result.stderr[-2000:]
