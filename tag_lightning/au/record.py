"""The AU record: everything the AU pipeline knows about one image, in original-image pixels.

One record per image, whatever happened to it: `status` says whether a face was found and
passed the quality check, `reason` says why not. Its JSON form (`to_json`) is the contract that
`tag prepare au-show --json`, the teachers and the datamodule rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STATUSES = ("ok", "no_face", "low_quality", "unreadable")


@dataclass
class AURecord:
    image: str  # the image's name: its path, or a dataset id for images inside a CSV
    content_hash: str
    status: str
    reason: str | None = None
    size: tuple[int, int] | None = None  # original (width, height)
    face_box: list[float] | None = None
    landmarks: np.ndarray | None = None  # (478, 2) float32, original pixels
    blendshapes: dict[str, float] | None = None
    quality: dict = field(default_factory=dict)
    # "AU12" -> {"intensity": float | None, "source": str | None, "box": [x1, y1, x2, y2],
    #            optional "detection", "detection_source", "sides": {"left"/"right": {"box", "intensity"}}}
    aus: dict[str, dict] = field(default_factory=dict)
    faces_found: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown record status {self.status!r}; expected one of {STATUSES}")

    @property
    def has_face(self) -> bool:
        return self.landmarks is not None

    def intensity(self, au_key: str) -> float | None:
        entry = self.aus.get(au_key)
        return None if entry is None else entry.get("intensity")

    def activated(self, threshold: float = 1.0) -> list[tuple[str, float]]:
        """AUs at or above `threshold` intensity, strongest first (the teacher's top-K list)."""
        found = [(k, v["intensity"]) for k, v in self.aus.items() if v.get("intensity") is not None]
        return sorted([kv for kv in found if kv[1] >= threshold], key=lambda kv: -kv[1])

    def to_json(self) -> dict:
        """The documented JSON form (pixels of the original image)."""
        return {
            "image": self.image,
            "content_hash": self.content_hash,
            "status": self.status,
            "reason": self.reason,
            "size": None if self.size is None else list(self.size),
            "face_box": self.face_box,
            "landmarks": None if self.landmarks is None else np.round(self.landmarks, 2).tolist(),
            "blendshapes": self.blendshapes,
            "quality": self.quality,
            "aus": self.aus,
            "faces_found": self.faces_found,
        }

    def metadata(self) -> dict:
        """`to_json` without the landmarks: what the cache stores as text beside the landmark blob."""
        data = self.to_json()
        del data["landmarks"]
        return data

    @classmethod
    def from_metadata(cls, data: dict, landmarks: np.ndarray | None) -> "AURecord":
        size = data.get("size")
        return cls(
            image=data["image"],
            content_hash=data["content_hash"],
            status=data["status"],
            reason=data.get("reason"),
            size=None if size is None else (int(size[0]), int(size[1])),
            face_box=data.get("face_box"),
            landmarks=landmarks,
            blendshapes=data.get("blendshapes"),
            quality=data.get("quality") or {},
            aus=data.get("aus") or {},
            faces_found=data.get("faces_found", 0),
        )
