"""Small helpers the tests share (importable as `helpers`: setup.cfg puts tests/ on the path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tag_lightning.grounding.rewards import RewardResult

REPO = Path(__file__).resolve().parents[1]
AFFECTNET_HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
)


def newest_last_checkpoint(root: Path) -> Path:
    """The `last.ckpt` of the latest run under `root` (each run writes a new lightning_logs/version_N)."""
    return max(root.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime_ns)


def trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def run_python(args: list[str], timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository, with the repository importable (e.g. ``["-m", "tag_lightning.commands.cli", ...]``)
    and `env` added to the environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def completion_length(completion, references) -> RewardResult:
    """A test reward with spread between samples (the TAG rewards are all 0 for the tiny random model's
    gibberish): longer completions, in characters, score more."""
    return RewardResult(len(completion.text) / 100.0, {"characters": float(len(completion.text))})


def write_face(path: Path, size: tuple[int, int] = (100, 100), seed: int = 0) -> Path:
    """A small real image file; the format follows the suffix (.jpg, .png, ...)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def build_affectnet(
    root: Path,
    rows: Sequence[tuple[str, int | str]],
    *,
    split: str = "train",
    layout: str = "csv",
    header: bool = True,
    without_image: Sequence[str] = (),
    photos: Sequence[Path] = (),
) -> Path:
    """AffectNet with `rows` (image path, expression code) for one split.

    ``layout="csv"``: ``training.csv``/``validation.csv`` (official header unless `header` is
    False) and images under ``Manually_Annotated_Images/``. ``layout="folders"``:
    ``<split>/<code>/<file name>``. Images named in `without_image` are not written. The images are
    random pixels, or with `photos` (one per row) copies of those files: real faces an AU cache knows."""
    for seed, (image_path, code) in enumerate(rows):
        target = (
            root / "Manually_Annotated_Images" / image_path
            if layout == "csv"
            else root / split / str(code) / Path(image_path).name
        )
        if photos:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photos[seed], target)
        elif image_path not in without_image:
            write_face(target, size=(64, 64), seed=seed)
    if layout == "csv":
        lines = [AFFECTNET_HEADER] if header else []
        landmarks = ";".join(["10.5"] * 136)
        lines += [f"{image_path},4,5,56,56,{landmarks},{code},0.25,-0.5" for image_path, code in rows]
        csv_name = "training.csv" if split == "train" else "validation.csv"
        (root / csv_name).write_text("\n".join(lines) + "\n")
    return root
