"""AU intensity sources: a LibreFace-compatible network and a mediapipe-blendshape fallback.

Both implement `AUSource`: faces in (pixels + landmarks), per-AU measurements out, each value
carrying the name of the source that measured it. LibreFace weights are the user's to supply
(`combined_resnet.pt`, strictly loaded, never downloaded); without them the blendshape source
serves alone and every record says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from tag_lightning.au.alignment import align_face, alignment_fingerprint, network_input
from tag_lightning.au.landmarks import FaceLandmarks
from tag_lightning.errors import BadValue

MAX_INTENSITY = 5.0

# LibreFace's two heads: DISFA intensities (0-5) and BP4D occurrence detections.
DISFA_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)


@dataclass(frozen=True)
class AUValue:
    """One AU measured on one face by one source."""

    intensity: float | None  # 0-5 FACS-like intensity; None when the source only detects
    source: str
    detection: float | None = None  # occurrence probability, for sources that detect
    sides: dict[str, float] | None = None  # per-side intensity (subject's left/right) when known


@dataclass(frozen=True)
class Face:
    """What an AU source needs: the image and the face's landmarks in its pixels."""

    rgb: np.ndarray
    landmarks: FaceLandmarks


class AUSource(Protocol):
    name: str
    fingerprint: str  # changes whenever the source's outputs could change; part of the cache key

    def measure(self, faces: Sequence[Face]) -> list[dict[int, AUValue]]:
        """Per face, the AUs this source measures."""


# ---------------------------------------------------------------------------------------------
# Blendshape source
# ---------------------------------------------------------------------------------------------

# mediapipe's 52 ARKit-style blendshapes -> FACS AUs. Each AU lists, per side (the subject's
# left/right, or "center" for midline AUs), the blendshapes that express it and how they combine
# within the side ("mean" or "max"); the AU's value is the mean over its sides, and the score in
# [0, 1] is scaled to the 0-5 intensity range. Approximations, documented so their limits are
# visible: mediapipe's cheekSquint barely fires, so the cheek raiser (AU6) averages it with
# eyeSquint, which it shares with the lid tightener (AU7); mouthPucker stands in for the lip
# tightener (AU23); "lips part" (AU25) is the larger of jaw opening and lower-lip lowering.
def _sided(left: tuple[str, ...], right: tuple[str, ...], reduce: str = "mean") -> tuple[str, dict]:
    return reduce, {"left": left, "right": right}


def _center(*names: str) -> tuple[str, dict]:
    return "mean", {"center": names}


BLENDSHAPE_AUS: dict[int, tuple[str, dict[str, tuple[str, ...]]]] = {
    1: _center("browInnerUp"),
    2: _sided(("browOuterUpLeft",), ("browOuterUpRight",)),
    4: _sided(("browDownLeft",), ("browDownRight",)),
    5: _sided(("eyeWideLeft",), ("eyeWideRight",)),
    6: _sided(("cheekSquintLeft", "eyeSquintLeft"), ("cheekSquintRight", "eyeSquintRight")),
    7: _sided(("eyeSquintLeft",), ("eyeSquintRight",)),
    9: _sided(("noseSneerLeft",), ("noseSneerRight",)),
    10: _sided(("mouthUpperUpLeft",), ("mouthUpperUpRight",)),
    12: _sided(("mouthSmileLeft",), ("mouthSmileRight",)),
    14: _sided(("mouthDimpleLeft",), ("mouthDimpleRight",)),
    15: _sided(("mouthFrownLeft",), ("mouthFrownRight",)),
    17: _center("mouthShrugLower"),
    20: _sided(("mouthStretchLeft",), ("mouthStretchRight",)),
    23: _center("mouthPucker"),
    24: _sided(("mouthPressLeft",), ("mouthPressRight",)),
    25: _sided(("jawOpen", "mouthLowerDownLeft"), ("jawOpen", "mouthLowerDownRight"), reduce="max"),
    26: _center("jawOpen"),
}
BLENDSHAPE_MAPPING_VERSION = "2"


def _blendshape_value(reduce: str, sides: dict[str, tuple[str, ...]], scores: dict[str, float]) -> AUValue:
    combine = max if reduce == "max" else (lambda values: sum(values) / len(values))
    per_side = {side: MAX_INTENSITY * combine([scores.get(n, 0.0) for n in names]) for side, names in sides.items()}
    intensity = sum(per_side.values()) / len(per_side)
    bilateral = "center" not in per_side
    return AUValue(intensity, "blendshape", sides={k: round(v, 4) for k, v in per_side.items()} if bilateral else None)


class BlendshapeAUSource:
    """AU intensities from mediapipe's blendshapes: always available, coarse."""

    name = "blendshape"
    fingerprint = f"blendshape-v{BLENDSHAPE_MAPPING_VERSION}"

    def measure(self, faces: Sequence[Face]) -> list[dict[int, AUValue]]:
        return [
            {au: _blendshape_value(reduce, sides, face.landmarks.blendshapes) for au, (reduce, sides) in BLENDSHAPE_AUS.items()}
            for face in faces
        ]


# ---------------------------------------------------------------------------------------------
# LibreFace source
# ---------------------------------------------------------------------------------------------


def build_libreface_net(dropout: float = 0.1):
    """LibreFace's combined AU model: ResNet-18 encoder + intensity head + detection head.

    Module names match the official `combined_resnet.pt` state dict key for key
    (`encoder.*`, `classifier.*`, `classifier_2.*`).
    """
    import torch.nn as nn
    import torchvision

    class LibreFaceAUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            resnet = torchvision.models.resnet18(weights=None)
            self.encoder = nn.Sequential(*list(resnet.children())[:-1])  # drop the ImageNet fc
            self.classifier = self._head(len(DISFA_AUS))  # AU intensity (recognition)
            self.classifier_2 = self._head(len(BP4D_AUS))  # AU occurrence (detection)

        @staticmethod
        def _head(outputs: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(512, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Dropout(dropout),
                nn.Linear(128, outputs), nn.Sigmoid(),
            )

        def forward(self, images):
            """Images (B, 3, 224, 224) -> (intensities 0-5 (B, 12), detection probabilities (B, 12))."""
            features = self.encoder(images).flatten(1)
            return self.classifier(features) * MAX_INTENSITY, self.classifier_2(features)

    return LibreFaceAUNet()


class CheckpointMismatch(BadValue):
    """A weights file does not fit the LibreFace network."""


def load_libreface_weights(net, path: str | Path) -> None:
    """Strictly load an official-format checkpoint ``{'model': state_dict}`` into `net`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LibreFace weights not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a weights file is data: anything unloadable is the user's file
        raise CheckpointMismatch(f"{path}: not a loadable PyTorch weights file ({err})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointMismatch(
            f"{path}: expected LibreFace's format {{'model': state_dict}} (combined_resnet.pt); found {found}"
        )
    state = checkpoint["model"]
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
            if keys
        ]
        raise CheckpointMismatch(f"{path} does not match the LibreFace AU network: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


def file_digest(path: str | Path) -> str:
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def libreface_fingerprint(weights: str | Path) -> str:
    """The weights and the alignment: a change to either changes LibreFace's numbers."""
    return f"libreface-{file_digest(weights)}+{alignment_fingerprint()}"


class LibreFaceAUSource:
    """LibreFace-compatible AU network on CPU or GPU, batched over faces."""

    name = "libreface"

    def __init__(self, weights: str | Path, device: str = "cpu", batch_size: int = 32):
        import torch

        self.weights = Path(weights)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = build_libreface_net()
        load_libreface_weights(self.net, self.weights)
        # channels_last: the convolution layout oneDNN runs fastest on CPU (~20% here), same numbers
        self.net.eval().to(self.device, memory_format=torch.channels_last)
        self.fingerprint = libreface_fingerprint(self.weights)

    def measure(self, faces: Sequence[Face]) -> list[dict[int, AUValue]]:
        import torch

        results: list[dict[int, AUValue]] = []
        for start in range(0, len(faces), self.batch_size):
            chunk = faces[start:start + self.batch_size]
            batch = np.stack([network_input(align_face(f.rgb, f.landmarks.points)) for f in chunk])
            images = torch.from_numpy(batch).to(self.device, memory_format=torch.channels_last)
            with torch.inference_mode():
                intensities, detections = self.net(images)
            for face_int, face_det in zip(intensities.cpu().numpy(), detections.cpu().numpy()):
                values = {au: AUValue(float(v), self.name) for au, v in zip(DISFA_AUS, face_int)}
                for au, p in zip(BP4D_AUS, face_det):
                    previous = values.get(au)
                    values[au] = AUValue(previous.intensity if previous else None, self.name, detection=float(p))
                results.append(values)
        return results
