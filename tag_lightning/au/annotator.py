"""Image -> AU record: decode, landmarks, AU regions, AU intensities, quality.

The one place that combines the pieces of `au/`; the cache builder runs it in worker processes.
Every failure mode of an input image becomes a record status, never an exception.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from tag_lightning.au import regions as regions_module
from tag_lightning.au.detectors import (
    AUSource,
    AUValue,
    BlendshapeAUSource,
    Face,
    LibreFaceAUSource,
    file_digest,
    libreface_fingerprint,
)
from tag_lightning.au.landmarks import FaceLandmarkDetector, LandmarkerConfig
from tag_lightning.au.quality import QualityThresholds, assess_quality
from tag_lightning.au.record import AURecord
from tag_lightning.au.regions import RegionBox, au_region_boxes
from tag_lightning.au.taxonomy import ACTION_UNITS
from tag_lightning.boxes import round_box
from tag_lightning.images import ImageRef, UnreadableImage, content_hash, decode_image

# Larger images are decoded at reduced size (JPEG draft mode): landmarks and the 256 px aligned
# face lose nothing, and a 6000x6000 photo decodes in a fraction of the time.
DECODE_MAX_SIDE = 2048
PIPELINE_VERSION = "1"  # bump when the record's computation changes in a way settings don't show


@dataclass(frozen=True)
class AnnotatorConfig:
    """Everything that decides a record's content; its fingerprint keys the AU cache."""

    landmarker: LandmarkerConfig = field(default_factory=LandmarkerConfig)
    libreface_weights: str | None = None  # None: blendshape AUs only
    device: str = "cpu"
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)


class AUAnnotator:
    """Turns images into AU records. Close it (or use `with`) to release mediapipe."""

    def __init__(self, config: AnnotatorConfig | None = None):
        self.config = config or AnnotatorConfig()
        self.settings_key, self.settings = annotator_settings(self.config)
        self.landmarks = FaceLandmarkDetector(self.config.landmarker)
        # Priority order: the first source that measures an AU's intensity provides it.
        self.sources: list[AUSource] = []
        if self.config.libreface_weights:
            self.sources.append(LibreFaceAUSource(self.config.libreface_weights, self.config.device))
        self.sources.append(BlendshapeAUSource())

    def __enter__(self) -> "AUAnnotator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.landmarks.close()

    def annotate(self, refs: Sequence[ImageRef]) -> list[AURecord]:
        """Records for a batch of images (AU networks run batched over the faces found)."""
        records: list[AURecord] = []
        faces: list[tuple[AURecord, Face]] = []
        for ref in refs:
            record, face = self._landmark_one(ref, *read_and_hash(ref))
            records.append(record)
            if face is not None:
                faces.append((record, face))
        measured = [source.measure([face for _, face in faces]) for source in self.sources]
        for index, (record, _) in enumerate(faces):
            per_source = [source_values[index] for source_values in measured]
            record.aus = _merge_aus(per_source, au_region_boxes(record.landmarks, tuple(record.face_box)))
        return records

    def _landmark_one(self, ref: ImageRef, data: bytes | None, digest: str) -> tuple[AURecord, Face | None]:
        """The record up to its AUs, and the face to measure them on (None without a face)."""
        if data is None:
            return AURecord(ref.name, digest, "unreadable", reason="the file could not be read"), None
        try:
            rgb, size = decode_image(data, ref.name, max_side=DECODE_MAX_SIDE)
        except UnreadableImage as err:
            return AURecord(ref.name, digest, "unreadable", reason=str(err)), None
        found = self.landmarks.detect(rgb)
        if found is None:
            return AURecord(ref.name, digest, "no_face", reason="no face detected", size=size), None
        scale = size[0] / rgb.shape[1]
        quality, failure = assess_quality(rgb, found.face_box, found.detection_score, scale, self.config.thresholds)
        record = AURecord(
            image=ref.name,
            content_hash=digest,
            status="low_quality" if failure else "ok",
            reason=failure,
            size=size,
            face_box=[round(v * scale, 2) for v in found.face_box],
            landmarks=(found.points * scale).astype(np.float32),
            blendshapes={k: round(v, 4) for k, v in found.blendshapes.items()},
            quality=quality,
            faces_found=found.faces_found,
        )
        return record, Face(rgb, found)


def source_names(config: AnnotatorConfig) -> list[str]:
    """The AU sources a config uses, in priority order."""
    return (["libreface"] if config.libreface_weights else []) + ["blendshape"]


def annotator_settings(config: AnnotatorConfig) -> tuple[str, dict]:
    """The cache key and the settings it stands for; cheap (file digests, no model loading)."""
    import mediapipe

    fingerprints = {"blendshape": BlendshapeAUSource().fingerprint}
    if config.libreface_weights:
        fingerprints["libreface"] = libreface_fingerprint(config.libreface_weights)
    settings = {
        "pipeline": PIPELINE_VERSION,
        "mediapipe": mediapipe.__version__,
        "landmarker": file_digest(config.landmarker.resolved_model_path()),
        "max_faces": config.landmarker.max_faces,
        "min_detection_confidence": config.landmarker.min_detection_confidence,
        "min_presence_confidence": config.landmarker.min_presence_confidence,
        "regions": hashlib.blake2b(
            repr((regions_module.REGION_LANDMARKS, regions_module.PAD_FRACTION)).encode(), digest_size=6
        ).hexdigest(),
        "sources": [fingerprints[name] for name in source_names(config)],
        "thresholds": asdict(config.thresholds),
    }
    key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()
    return key, settings


def read_and_hash(ref: ImageRef) -> tuple[bytes | None, str]:
    """The image's bytes and content hash; unreadable files hash their name, so they get a key too."""
    try:
        data = ref.read_bytes()
    except (OSError, UnreadableImage):
        return None, content_hash(f"unreadable:{ref.name}".encode())
    return data, content_hash(data)


def _merge_aus(per_source: list[dict[int, AUValue]], boxes: dict[int, RegionBox]) -> dict[str, dict]:
    """One entry per taxonomy AU: the first source's intensity, any source's detection, boxes."""
    merged = {}
    for au in ACTION_UNITS:
        values = [values[au.id] for values in per_source if au.id in values]
        with_intensity = next((v for v in values if v.intensity is not None), None)
        with_detection = next((v for v in values if v.detection is not None), None)
        region = boxes[au.id]
        entry: dict = {
            "intensity": None if with_intensity is None else round(with_intensity.intensity, 4),
            "source": with_intensity.source if with_intensity else (with_detection.source if with_detection else None),
            "box": round_box(region.box),
        }
        if with_detection is not None:
            entry["detection"] = round(with_detection.detection, 4)
            entry["detection_source"] = with_detection.source
        if region.sides is not None:
            side_intensity = (with_intensity.sides or {}) if with_intensity else {}
            entry["sides"] = {
                side: {"box": round_box(box), "intensity": side_intensity.get(side)}
                for side, box in region.sides.items()
            }
        merged[au.key] = entry
    return merged
