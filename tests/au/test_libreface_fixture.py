"""LibreFace fidelity: our alignment and network against LibreFace 0.2.0's own outputs.

The fixture (`tests/fixtures/libreface/`, made by its `make_fixture.py` with LibreFace's code in a
separate environment) holds, per photo, LibreFace's landmarks, its aligned face (reduced 4x) and
its outputs on a random-weights checkpoint in the official format, rebuilt here from its seed.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.libreface.make_fixture import compare, fixture_photo, load_fixture, random_checkpoint, state_digest

FIXTURE = load_fixture()


@pytest.fixture(scope="module")
def fixture_net():
    from tag_lightning.au.detectors import build_libreface_net

    state = random_checkpoint()
    if state_digest(state) != FIXTURE["checkpoint_sha256"]:
        pytest.fail("torch.manual_seed(0) no longer rebuilds the fixture's weights: rerun make_fixture.py")
    net = build_libreface_net()
    net.load_state_dict(state)
    return net.eval()


@pytest.mark.parametrize("name", sorted(FIXTURE["images"]))
def test_with_libreface_landmarks_we_align_and_measure_as_libreface_does(name, samples_dir, fixture_net):
    entry = FIXTURE["images"][name]
    rgb = fixture_photo(samples_dir, name, entry)
    assert [rgb.shape[1], rgb.shape[0]] == entry["size"]
    result = compare(name, entry, rgb, np.array(entry["landmarks"]), fixture_net)
    assert result["face_mad"] <= 1.0, result
    assert result["intensity_max"] <= 0.01, result
    assert result["detection_flips"] == 0, result


def test_the_libreface_source_measures_what_libreface_does(samples_dir, tmp_path):
    """The source the annotator runs (batched, channels_last) on LibreFace's landmarks."""
    import torch

    from tag_lightning.au.detectors import BP4D_AUS, DISFA_AUS, Face, LibreFaceAUSource
    from tag_lightning.au.landmarks import FaceLandmarks

    weights = tmp_path / "combined_resnet.pt"
    torch.save({"model": random_checkpoint()}, weights)
    entries = FIXTURE["images"]
    faces = [
        Face(fixture_photo(samples_dir, name, entry),
             FaceLandmarks(np.array(entry["landmarks"]), {}, (0, 0, 0, 0), None, 1))
        for name, entry in entries.items()
    ]
    for values, entry in zip(LibreFaceAUSource(weights, batch_size=4).measure(faces), entries.values()):
        assert np.allclose([values[au].intensity for au in DISFA_AUS], entry["intensities"], atol=0.01)
        assert [values[au].detection >= 0.5 for au in BP4D_AUS] == [p >= 0.5 for p in entry["detections"]]


def test_with_our_landmarks_the_deviation_stays_small(samples_dir, annotator, fixture_net):
    """The whole path from the photo; the figures are in the README (bench/libreface_fidelity.py)."""
    for name, entry in FIXTURE["images"].items():
        rgb = fixture_photo(samples_dir, name, entry)
        face = annotator.landmarks.detect(rgb)
        result = compare(name, entry, rgb, face.points, fixture_net)
        assert result["landmark_px"] < 0.02 * max(rgb.shape), (name, result)
        assert result["intensity_max"] < 0.25, (name, result)


def test_the_median_with_implicit_zeros_is_numpys():
    from tag_lightning.au.alignment import _median_with_zeros

    rng = np.random.default_rng(0)
    for count, zeros in ((101, 0), (100, 37), (50, 51), (10, 200), (0, 5)):
        values = rng.uniform(0, 255, (count, 3)).astype(np.float32)
        everything = np.concatenate([values, np.zeros((zeros, 3), np.float32)])
        assert np.allclose(_median_with_zeros(values, zeros), np.median(everything, axis=0)), (count, zeros)
