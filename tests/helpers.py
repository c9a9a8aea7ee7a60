"""Small helpers the tests share (importable as `helpers`: setup.cfg puts tests/ on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tag_lightning.rewards import RewardResult

REPO = Path(__file__).resolve().parents[1]


def newest_last_checkpoint(root: Path) -> Path:
    """The `last.ckpt` of the latest run under `root` (each run writes a new lightning_logs/version_N)."""
    return max(root.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime_ns)


def trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def run_python(args: list[str], timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository, with the repository importable (e.g. ``["-m", "tag_lightning.cli", ...]``)
    and `env` added to the environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def completion_length(completion, references) -> RewardResult:
    """A test reward with spread between samples (the TAG rewards are all 0 for the tiny random model's
    gibberish): longer completions, in characters, score more."""
    return RewardResult(len(completion.text) / 100.0, {"characters": float(len(completion.text))})
