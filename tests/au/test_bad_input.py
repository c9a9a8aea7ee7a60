"""Every odd file a FER dataset holds gets the right status or a correct record, and the build goes on."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from tag_lightning.au.build import build_au_cache
from tag_lightning.au.cache import AUCache
from tag_lightning.data.samples import HAPPINESS, MULTI_FACE, NO_FACE
from tag_lightning.images import ImageRef, UnreadableImage, decode_image


def _happy(samples_dir) -> np.ndarray:
    return np.asarray(Image.open(samples_dir / HAPPINESS).convert("RGB"))


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


@pytest.fixture(scope="module")
def odd_files(samples_dir, tmp_path_factory):
    """One file per kind of trouble, written in its real format."""
    out = tmp_path_factory.mktemp("odd")
    happy = _happy(samples_dir)
    jpeg = (samples_dir / HAPPINESS).read_bytes()
    files = {}

    def write(name, data: bytes):
        (out / name).write_bytes(data)
        files[name] = out / name

    write("truncated.jpg", jpeg[: len(jpeg) // 3])
    write("empty.jpg", b"")
    write("text.jpg", b"this is not an image, just text\n" * 10)
    # FERPlus-like: 48x48 grayscale face
    face = happy[140:480, 100:400]
    grey48 = cv2.resize(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY), (48, 48), interpolation=cv2.INTER_AREA)
    write("ferplus_48.png", _png(grey48))
    # RGBA with a transparent border
    rgba = np.dstack([happy, np.full(happy.shape[:2], 255, np.uint8)])
    rgba[:20, :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    write("rgba.png", buf.getvalue())
    # 16-bit colour and 16-bit grey PNGs
    write("rgb16.png", _png(cv2.cvtColor(happy, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257))
    write("grey16.png", _png(cv2.cvtColor(happy, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257))
    # EXIF-rotated: pixels stored rotated, orientation tag 6 says "rotate 90 clockwise to view"
    portrait = happy[:, 40:440]  # 400 wide, 512 high upright
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(portrait, k=1)))  # rotated 90 ccw
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    write("exif_rotated.jpg", buf.getvalue())
    # A 6000x6000 camera-size photo
    big = cv2.resize(happy, (6000, 6000), interpolation=cv2.INTER_LINEAR)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    write("huge_6000.jpg", encoded.tobytes())
    files["no_face.jpg"] = samples_dir / NO_FACE
    files["multi_face.jpg"] = samples_dir / MULTI_FACE
    files["happy.jpg"] = samples_dir / HAPPINESS
    return files


@pytest.fixture(scope="module")
def odd_records(odd_files, tmp_path_factory):
    """One build over all the odd files (it must not stop on any of them)."""
    cache_dir = tmp_path_factory.mktemp("odd_cache")
    names = list(odd_files)
    refs = [ImageRef.from_path(odd_files[n]) for n in names]
    refs.append(ImageRef.from_path(odd_files["happy.jpg"].parent / "does_not_exist.jpg"))
    summary = build_au_cache(refs, cache_dir, progress=False)
    assert summary.total == summary.computed == len(refs)
    cache = AUCache(cache_dir)
    records = {n: cache.get_by_name(str(odd_files[n])) for n in names}
    records["missing"] = cache.get_by_name(refs[-1].name)
    return records


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.jpg", "text.jpg", "missing"])
def test_undecodable_files_are_recorded_as_unreadable(odd_records, name):
    record = odd_records[name]
    assert record.status == "unreadable" and record.reason and record.landmarks is None


def test_empty_and_text_files_say_why():
    with pytest.raises(UnreadableImage, match="empty"):
        decode_image(b"", "x.jpg")
    with pytest.raises(UnreadableImage, match="not a decodable image"):
        decode_image(b"hello", "x.jpg")


def test_ferplus_like_48px_grey_face_gets_a_correct_record(odd_records):
    record = odd_records["ferplus_48.png"]
    assert record.size == (48, 48)
    assert record.status in ("ok", "low_quality"), record.reason
    assert record.landmarks.shape == (478, 2)
    x1, y1, x2, y2 = record.face_box
    assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48


@pytest.mark.parametrize("name", ["rgba.png", "rgb16.png", "grey16.png"])
def test_alpha_and_16_bit_images_are_annotated(odd_records, name):
    record = odd_records[name]
    reference = odd_records["happy.jpg"]
    assert record.status == "ok", record.reason
    assert np.abs(record.landmarks - reference.landmarks).mean() < 4.0
    assert record.intensity("AU12") > 2.0


def test_decoded_16_bit_pixels_keep_their_range(odd_files):
    rgb, _ = decode_image(odd_files["grey16.png"].read_bytes())
    assert rgb.dtype == np.uint8 and rgb.max() > 200 and rgb.shape[2] == 3


def test_exif_rotation_is_applied(odd_records):
    record = odd_records["exif_rotated.jpg"]
    reference = odd_records["happy.jpg"]
    assert record.status == "ok" and record.size == (400, 512)
    shifted = reference.landmarks - np.array([40.0, 0.0], dtype=np.float32)
    assert np.abs(record.landmarks - shifted).mean() < 4.0


def test_huge_image_keeps_original_pixel_coordinates(odd_records):
    record = odd_records["huge_6000.jpg"]
    reference = odd_records["happy.jpg"]
    assert record.status == "ok" and record.size == (6000, 6000)
    scaled = reference.landmarks * (6000 / 512)
    assert np.abs(record.landmarks - scaled).mean() < 6000 / 512 * 4
    assert max(record.face_box) <= 6000


def test_face_less_and_multi_face_photos(odd_records):
    assert odd_records["no_face.jpg"].status == "no_face"
    multi = odd_records["multi_face.jpg"]
    assert multi.status == "ok" and multi.faces_found >= 2
