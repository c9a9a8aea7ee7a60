"""LibreFace's face alignment, reproduced step by step from mediapipe landmarks.

LibreFace 0.2.0 aligns a face FFHQ-style (`detect_mediapipe_image.image_align`), writes the
result as a 512 px PNG, and its AU solver reads it back with `Resize(256)` + `CenterCrop(224)`.
Same landmarks in, same pixels out: this module does the same steps in the same order with the
same resampling filters, so a LibreFace checkpoint sees the input it was trained on.

1. Quad: an oriented square centred a little below the eyes (10% of the eye-to-mouth vector),
   half-side the larger of 2x eye-to-eye and 1.8x eye-to-mouth, rotated so the eyes are level.
2. Shrink: when the quad is 1024 px or more, the image is reduced by an integer factor
   (PIL Lanczos; LibreFace's `Image.ANTIALIAS`).
3. Crop to the quad's bounding box plus a border of 10% of the quad (at least 3 px).
4. Pad: when the quad comes within 4 px of an edge, every side gets at least 30% of the quad of
   black, blurred towards the edges and faded to the image's median colour, as FFHQ does.
5. The quad is resampled to 512x512 (PIL bilinear quad transform, no supersampling).
6. 512 -> 256 by PIL bilinear (which antialiases when reducing); the network takes the centre
   224 crop with ImageNet normalisation.

`tests/au/test_libreface_fixture.py` checks this against LibreFace's own outputs
(`tests/fixtures/libreface/`). `ALIGNMENT_SETTINGS` is part of the AU cache key: change any
step and bump it, so records aligned the old way are not served.
"""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
from PIL import Image

# The landmark sets LibreFace averages: each eye's contour (16 points) and the outer lip contour,
# whose leftmost and rightmost points are the mouth corners (first of equals, in this order).
SUBJECT_LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398)
SUBJECT_RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
        78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415)

TRANSFORM_SIZE = 512  # LibreFace's aligned image, as written to disk
ALIGNED_SIZE = 256  # its solver's Resize
CROP_SIZE = 224
BORDER, PAD, BLUR = 0.1, 0.3, 0.02  # fractions of the quad size
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

ALIGNMENT_SETTINGS = {
    "method": "libreface-0.2.0-image_align",
    "version": 2,
    "sizes": (TRANSFORM_SIZE, ALIGNED_SIZE, CROP_SIZE),
    "border_pad_blur": (BORDER, PAD, BLUR),
}


def alignment_fingerprint() -> str:
    """Names the alignment in the AU cache key; the digest catches a changed constant left unbumped."""
    digest = hashlib.blake2b(json.dumps(ALIGNMENT_SETTINGS, sort_keys=True).encode(), digest_size=4).hexdigest()
    return f"{ALIGNMENT_SETTINGS['method']}-v{ALIGNMENT_SETTINGS['version']}-{digest}"


def alignment_quad(points: np.ndarray) -> np.ndarray:
    """The oriented square (4 corners, image pixels, float64) LibreFace crops the face with.

    Corners in PIL's quad order: top-left, bottom-left, bottom-right, top-right.
    """
    points = np.asarray(points, dtype=np.float64)
    image_left_eye = points[list(SUBJECT_RIGHT_EYE)].mean(axis=0)  # subject's right = image left
    image_right_eye = points[list(SUBJECT_LEFT_EYE)].mean(axis=0)
    lips = points[list(LIPS)]
    mouth = (lips[lips[:, 0].argmin()] + lips[lips[:, 0].argmax()]) / 2.0
    eye_avg = (image_left_eye + image_right_eye) / 2.0
    eye_to_eye = image_right_eye - image_left_eye
    eye_to_mouth = mouth - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
    x = x / (np.hypot(*x) or 1.0)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1.0, 1.0])
    center = eye_avg + eye_to_mouth * 0.1
    return np.stack([center - x - y, center - x + y, center + x + y, center + x - y])


def align_face(rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 256x256 aligned face (RGB uint8) that LibreFace's network crops its input from."""
    return np.asarray(align_face_512(rgb, points).resize((ALIGNED_SIZE, ALIGNED_SIZE), Image.Resampling.BILINEAR))


def align_face_512(rgb: np.ndarray, points: np.ndarray) -> Image.Image:
    """LibreFace's aligned image as it writes it: the quad resampled to 512x512 (steps 1-5)."""
    image = Image.fromarray(rgb)
    quad = alignment_quad(points)
    quad_size = float(np.hypot(*(quad[3] - quad[0])))

    shrink = int(np.floor(quad_size / ALIGNED_SIZE * 0.5))
    if shrink > 1:
        image = image.resize((round(image.width / shrink), round(image.height / shrink)), Image.Resampling.LANCZOS)
        quad, quad_size = quad / shrink, quad_size / shrink

    border = max(round(quad_size * BORDER), 3)
    left, top = np.floor(quad.min(axis=0)).astype(int)
    right, bottom = np.ceil(quad.max(axis=0)).astype(int)
    crop = (max(left - border, 0), max(top - border, 0),
            min(right + border, image.width), min(bottom + border, image.height))
    if crop[2] - crop[0] < image.width or crop[3] - crop[1] < image.height:
        image = image.crop(crop)
        quad = quad - crop[:2]

    left, top = np.floor(quad.min(axis=0)).astype(int)
    right, bottom = np.ceil(quad.max(axis=0)).astype(int)
    pad = (max(border - left, 0), max(border - top, 0),
           max(right - image.width + border, 0), max(bottom - image.height + border, 0))
    if max(pad) > border - 4:
        pad = tuple(max(p, round(quad_size * PAD)) for p in pad)
        quad = quad + pad[:2]
        # The quad transform reads only the quad's neighbourhood: only that part of the padded image is made.
        window = (*(np.floor(quad.min(axis=0)).astype(int) - 2), *(np.ceil(quad.max(axis=0)).astype(int) + 3))
        image = Image.fromarray(_pad_and_fade(np.asarray(image), pad, quad_size * BLUR, window))
        quad = quad - window[:2]

    return image.transform((TRANSFORM_SIZE, TRANSFORM_SIZE), Image.Transform.QUAD, tuple((quad + 0.5).flatten()),
                           Image.Resampling.BILINEAR)


def _pad_and_fade(rgb: np.ndarray, pad: tuple[int, int, int, int], sigma: float,
                  window: tuple[int, int, int, int]) -> np.ndarray:
    """FFHQ padding: black borders (left, top, right, bottom), blurred and faded to the median colour.

    The fade weight grows from the photo's edge into the padding, and the blur reaches a third of
    a padding width into the photo, so the seam is soft rather than a hard black edge. Returns the
    `window` (x0, y0, x1, y1) of the padded image. The blur is computed on the photo and a margin
    of its radius only: further out, blurred padding is exactly the black it was (those zeros
    still count in the median).
    """
    left, top, right, bottom = pad
    height, width = rgb.shape[0] + top + bottom, rgb.shape[1] + left + right
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    fade = np.maximum(1.0 - np.minimum(xs / left, (width - 1 - xs) / right)[None, :],
                      1.0 - np.minimum(ys / top, (height - 1 - ys) / bottom)[:, None])

    margin = min(int(4.0 * sigma + 0.5), *pad)
    photo = cv2.copyMakeBorder(rgb, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    near_x, near_y = left - margin, top - margin
    near_fade = fade[near_y:near_y + photo.shape[0], near_x:near_x + photo.shape[1]]
    near = _gaussian_blur(photo, sigma)  # pixel + (blurred - pixel) * weight, in place:
    near -= photo
    near *= _planes(np.clip(near_fade * 3.0 + 1.0, 0.0, 1.0))
    near += photo
    median = _median_with_zeros(near.reshape(-1, 3), height * width - near.shape[0] * near.shape[1])

    # pixel + (median - pixel) * fade, where pixel is 0 outside `near`
    x0, y0, x1, y1 = window
    window_fade = np.clip(fade[y0:y1, x0:x1], 0.0, 1.0)
    image = cv2.merge([window_fade * value for value in median])
    ox0, oy0 = max(x0, near_x), max(y0, near_y)
    ox1, oy1 = min(x1, near_x + near.shape[1]), min(y1, near_y + near.shape[0])
    overlap = (slice(oy0 - y0, oy1 - y0), slice(ox0 - x0, ox1 - x0))
    near_overlap = near[oy0 - near_y:oy1 - near_y, ox0 - near_x:ox1 - near_x]
    image[overlap] += near_overlap * (1.0 - _planes(window_fade[overlap]))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _planes(weight: np.ndarray) -> np.ndarray:
    """A per-pixel weight repeated for the 3 channels (numpy broadcasting over a last axis of 3 is slow)."""
    return cv2.merge([np.ascontiguousarray(weight)] * 3)


def _median_with_zeros(values: np.ndarray, zeros: int) -> np.ndarray:
    """Per-channel median of `values` (N, 3), all >= 0, and `zeros` more pixels of 0: np.median's answer."""
    total = len(values) + zeros
    middle = [(total - 1) // 2 - zeros, total // 2 - zeros]  # np.median averages the middle two
    ranks = [r for r in middle if r >= 0]  # a negative rank falls among the zeros
    if not ranks:
        return np.zeros(3, dtype=np.float32)
    return np.array([np.partition(channel, ranks)[ranks].sum() / 2.0 for channel in np.ascontiguousarray(values.T)],
                    dtype=np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Float32 separable Gaussian with scipy.ndimage's kernel (radius 4 sigma); zeros beyond the edges."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (taps / taps.sum()).astype(np.float32)
    return cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_CONSTANT)


def network_input(aligned: np.ndarray) -> np.ndarray:
    """Centre 224 crop, [0, 1] scaling and ImageNet normalisation; (3, 224, 224) float32."""
    offset = (ALIGNED_SIZE - CROP_SIZE) // 2
    crop = aligned[offset:offset + CROP_SIZE, offset:offset + CROP_SIZE].astype(np.float32) / 255.0
    return ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()
