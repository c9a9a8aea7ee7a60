"""The AU cache: keyed by content and settings, resumable after a kill, cheap to read."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tag_lightning.au.annotator import AnnotatorConfig, annotator_settings
from tag_lightning.au.build import build_au_cache
from tag_lightning.au.cache import AUCache
from tag_lightning.au.quality import QualityThresholds
from tag_lightning.data.samples import HAPPINESS, SAMPLE_LABELS
from tag_lightning.images import ImageRef, content_hash


def _refs(folder: Path) -> list[ImageRef]:
    return [ImageRef.from_path(folder / name) for name in SAMPLE_LABELS]


def test_rebuild_recomputes_only_new_images(samples_dir, tmp_path):
    refs = _refs(samples_dir)
    first = build_au_cache(refs[:3], tmp_path, progress=False)
    assert (first.computed, first.cached) == (3, 0)
    second = build_au_cache(refs, tmp_path, progress=False)
    assert (second.computed, second.cached) == (len(refs) - 3, 3)
    assert sum(second.statuses.values()) == len(refs)
    third = build_au_cache(refs, tmp_path, progress=False)
    assert (third.computed, third.cached) == (0, len(refs))


def test_a_changed_image_or_setting_is_recomputed(samples_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in SAMPLE_LABELS:
        (folder / name).write_bytes((samples_dir / name).read_bytes())
    refs = _refs(folder)
    build_au_cache(refs, tmp_path / "cache", progress=False)
    # change one image's content: only it is recomputed
    (folder / HAPPINESS).write_bytes((samples_dir / HAPPINESS).read_bytes() + b"\x00")
    again = build_au_cache(refs, tmp_path / "cache", progress=False)
    assert again.computed == 1
    # change a setting: everything is recomputed under a new key, old records stay
    strict = AnnotatorConfig(thresholds=QualityThresholds(min_sharpness=10_000.0))
    changed = build_au_cache(refs, tmp_path / "cache", strict, progress=False)
    assert changed.computed == len(refs) and changed.statuses["low_quality"] == len(refs) - 1
    cache = AUCache(tmp_path / "cache")
    assert cache.get_by_name(str(folder / "single_face.jpg")).status == "low_quality"
    assert "blurry" in cache.get_by_name(str(folder / "single_face.jpg")).reason


def test_a_changed_alignment_invalidates_libreface_records(samples_dir, tmp_path, monkeypatch):
    """LibreFace records measured on faces aligned another way are recomputed, not served."""
    import torch

    from tag_lightning.au import alignment
    from tag_lightning.au.detectors import build_libreface_net

    torch.manual_seed(0)
    weights = tmp_path / "combined_resnet.pt"
    torch.save({"model": build_libreface_net().state_dict()}, weights)
    refs = _refs(samples_dir)[:2]
    config = AnnotatorConfig(libreface_weights=str(weights))
    assert build_au_cache(refs, tmp_path / "cache", config, progress=False).computed == 2
    blendshape_key = annotator_settings(AnnotatorConfig())[0]

    monkeypatch.setitem(alignment.ALIGNMENT_SETTINGS, "border_pad_blur", (0.1, 0.3, 0.03))
    again = build_au_cache(refs, tmp_path / "cache", config, progress=False)
    assert (again.computed, again.cached) == (2, 0)
    assert annotator_settings(AnnotatorConfig())[0] == blendshape_key  # blendshape AUs need no alignment


def test_records_round_trip_and_read_fast_without_mediapipe(samples_dir, tmp_path, sample_records):
    build_au_cache(_refs(samples_dir), tmp_path, progress=False)
    cache = AUCache(tmp_path)
    data = (samples_dir / HAPPINESS).read_bytes()
    record = cache.get(content_hash(data))
    reference = sample_records[HAPPINESS]
    assert record.status == "ok" and record.aus == reference.aus
    assert np.allclose(record.landmarks, reference.landmarks, atol=1e-3)
    # the JSON contract of au-show
    as_json = record.to_json()
    assert {"image", "status", "reason", "face_box", "landmarks", "quality", "aus"} <= set(as_json)
    assert len(as_json["landmarks"]) == 478
    # reading needs no mediapipe: a fresh interpreter reads the record with mediapipe blocked
    code = (
        "import sys; sys.modules['mediapipe'] = None\n"
        "from tag_lightning.au.cache import AUCache\n"
        f"r = AUCache({str(tmp_path)!r}).get({content_hash(data)!r}); print(r.status, r.landmarks.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "ok (478, 2)", out.stderr


def test_missing_cache_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="tag prepare au-cache"):
        AUCache(tmp_path / "nowhere")


@pytest.mark.slow
def test_a_killed_build_resumes_without_redoing_finished_images(samples_dir, tmp_path):
    """Kill a real `tag prepare au-cache` mid-build, then rerun: finished records are kept and skipped."""
    folder = tmp_path / "images"
    folder.mkdir()
    happy = (samples_dir / HAPPINESS).read_bytes()
    for i in range(120):  # distinct content: one appended byte after the JPEG end marker
        (folder / f"img_{i:03d}.jpg").write_bytes(happy + bytes([i]))
    cache_dir = tmp_path / "cache"
    command = [sys.executable, "-m", "tag_lightning.commands.cli", "prepare", "au-cache",
               "--images", str(folder), "--out", str(cache_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and done < 16:
        time.sleep(0.2)
        if (cache_dir / "records.sqlite").exists():
            try:
                with sqlite3.connect(cache_dir / "records.sqlite", timeout=5) as db:
                    done = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 16 <= done < 120, f"the build was not caught mid-way ({done} records)"
    with sqlite3.connect(cache_dir / "records.sqlite") as db:
        kept = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    assert kept >= done
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{120 - kept} computed, {kept} already cached" in resumed.stdout
    assert len(AUCache(cache_dir)) == 120
