"""Robust image decoding: every odd file the FER datasets contain becomes RGB uint8 or a clear error.

One place decides how EXIF rotation, alpha, 16-bit depth, grayscale and huge images are handled,
so the AU cache, the datamodule and the drawing code all see the same pixels.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Pillow refuses images above ~179 Mpx as a "decompression bomb"; FER photos are far smaller,
# and a 6000x6000 (36 Mpx) camera photo must load.
Image.MAX_IMAGE_PIXELS = 200_000_000


class UnreadableImage(ValueError):
    """The bytes are not a decodable image (empty, truncated, not an image at all)."""


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes come from.

    `name` identifies the image in records and logs (a file path, or a dataset id such as
    ``ferplus:train:123`` for images that live inside a CSV). `path` is set for files; `data`
    holds already-encoded bytes (e.g. PNG) for images that have no file of their own.
    """

    name: str
    path: str | None = None
    data: bytes | None = None

    @classmethod
    def from_path(cls, path: str | Path) -> "ImageRef":
        return cls(name=str(path), path=str(path))

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise UnreadableImage(f"{self.name}: neither a path nor bytes were given")
        return Path(self.path).read_bytes()


def content_hash(data: bytes) -> str:
    """Stable identity of an image's content, independent of where the file lives."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        gray = ((arr - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white so a transparent background does not turn black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, name: str = "<bytes>", max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode encoded image bytes to an RGB uint8 array, upright per its EXIF orientation.

    Returns the pixels and the original (upright) ``(width, height)``. With `max_side`, a larger
    image is decoded at reduced size (JPEG draft mode, then an area resize); pixels of the
    returned array map to the original by ``original_width / returned_width``.
    Raises `UnreadableImage` for anything undecodable.
    """
    if not data:
        raise UnreadableImage(f"{name}: the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        original_size = _upright_size(img)
        if max_side is not None and max(original_size) > max_side and img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb_uint8(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{name}: not a decodable image ({type(err).__name__}: {err})") from err
    if max_side is not None and max(rgb.shape[:2]) > max_side:
        import cv2

        factor = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb), original_size


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF rotation, read from the header without decoding pixels."""
    orientation = img.getexif().get(0x0112, 1)
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(ref: ImageRef) -> np.ndarray:
    """Full-resolution RGB uint8 pixels of an image reference."""
    try:
        data = ref.read_bytes()
    except OSError as err:
        raise UnreadableImage(f"{ref.name}: cannot read ({err})") from err
    return decode_image(data, ref.name)[0]
