"""AU intensities agree with the posed expressions of the real photos, and LibreFace weights load strictly."""

import numpy as np
import pytest
import torch

from tag_lightning.au.detectors import (
    BP4D_AUS,
    DISFA_AUS,
    CheckpointMismatch,
    Face,
    LibreFaceAUSource,
    build_libreface_net,
    load_libreface_weights,
)
from tag_lightning.data.samples import ANGER, HAPPINESS, SURPRISE


def _i(records, photo, au):
    return records[photo].intensity(au)


def test_happiness_smiles_more_than_anger(sample_records):
    assert _i(sample_records, HAPPINESS, "AU12") > _i(sample_records, ANGER, "AU12") + 2.0


def test_surprise_opens_the_jaw_and_raises_the_brows_more_than_happiness(sample_records):
    assert max(_i(sample_records, SURPRISE, "AU26"), _i(sample_records, SURPRISE, "AU25")) > \
        max(_i(sample_records, HAPPINESS, "AU26"), _i(sample_records, HAPPINESS, "AU25")) + 0.5
    assert _i(sample_records, SURPRISE, "AU1") > _i(sample_records, HAPPINESS, "AU1") + 1.0
    assert _i(sample_records, SURPRISE, "AU2") > _i(sample_records, HAPPINESS, "AU2")


def test_anger_lowers_the_brows_more_than_happiness(sample_records):
    assert _i(sample_records, ANGER, "AU4") > _i(sample_records, HAPPINESS, "AU4") + 1.0


@pytest.fixture
def official_checkpoint(tmp_path):
    """A randomly initialised network saved the way LibreFace ships combined_resnet.pt."""
    torch.manual_seed(0)
    path = tmp_path / "combined_resnet.pt"
    torch.save({"model": build_libreface_net().state_dict()}, path)
    return path


def test_random_official_format_checkpoint_loads_and_measures(official_checkpoint, sample_records, samples_dir):
    from tag_lightning.images import ImageRef, load_image

    source = LibreFaceAUSource(official_checkpoint, batch_size=2)
    faces = []
    for name in (HAPPINESS, ANGER, SURPRISE):
        record = sample_records[name]
        landmarks = type("L", (), {"points": record.landmarks})()
        faces.append(Face(load_image(ImageRef.from_path(samples_dir / name)), landmarks))
    results = source.measure(faces)
    assert len(results) == 3
    for values in results:
        intensities = [values[au].intensity for au in DISFA_AUS]
        assert len(intensities) == 12 and all(0.0 <= v <= 5.0 for v in intensities)
        detections = [values[au].detection for au in BP4D_AUS]
        assert len(detections) == 12 and all(0.0 <= p <= 1.0 for p in detections)
        assert {int(p >= 0.5) for p in detections} <= {0, 1}
        assert all(v.source == "libreface" for v in values.values())


def test_libreface_keys_match_the_official_layout():
    keys = set(build_libreface_net().state_dict())
    assert {"encoder.0.weight", "encoder.4.0.conv1.weight", "encoder.7.1.bn2.running_var",
            "classifier.0.weight", "classifier.2.running_mean", "classifier.4.bias",
            "classifier_2.4.weight"} <= keys


def test_a_wrong_checkpoint_names_the_mismatched_keys(tmp_path):
    state = build_libreface_net().state_dict()
    state["classifier.4.weight"] = torch.zeros(5, 128)
    del state["classifier_2.4.bias"]
    state["head.extra"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatch) as err:
        load_libreface_weights(build_libreface_net(), path)
    message = str(err.value)
    assert "classifier_2.4.bias" in message and "head.extra" in message and "classifier.4.weight" in message


def test_a_bare_state_dict_or_garbage_file_is_refused_clearly(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(build_libreface_net().state_dict(), bare)
    with pytest.raises(CheckpointMismatch, match="'model'"):
        load_libreface_weights(build_libreface_net(), bare)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="not a loadable"):
        load_libreface_weights(build_libreface_net(), garbage)


def test_alignment_is_level_and_centred(sample_records, samples_dir):
    """The aligned face has its eyes level and in the upper half, as LibreFace's network expects."""
    import cv2

    from tag_lightning.au.alignment import SUBJECT_LEFT_EYE, SUBJECT_RIGHT_EYE, align_face, alignment_quad
    from tag_lightning.images import ImageRef, load_image

    record = sample_records[HAPPINESS]
    rgb = load_image(ImageRef.from_path(samples_dir / HAPPINESS))
    aligned = align_face(rgb, record.landmarks)
    assert aligned.shape == (256, 256, 3) and aligned.dtype == np.uint8
    quad = alignment_quad(record.landmarks)
    matrix = cv2.getAffineTransform(quad[:3].astype(np.float32), np.float32([[0, 0], [0, 256], [256, 256]]))
    eyes = [record.landmarks[list(s)].mean(axis=0) for s in (SUBJECT_RIGHT_EYE, SUBJECT_LEFT_EYE)]
    mapped = [matrix @ np.append(e, 1.0) for e in eyes]
    assert abs(mapped[0][1] - mapped[1][1]) < 2.0
    assert 60 < mapped[0][1] < 128 and mapped[0][0] < 128 < mapped[1][0]
