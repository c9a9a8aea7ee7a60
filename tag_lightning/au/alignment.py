"""LibreFace's face alignment, computed from mediapipe landmarks.

LibreFace aligns a face FFHQ-style before its AU network sees it: an oriented square centred a
little below the eyes, sized from the eye-to-eye and eye-to-mouth distances, rotated so the eyes
are level, resampled to 256x256. Its network then takes the centre 224 crop with ImageNet
normalisation. This module reproduces that geometry as a single affine warp (pre-shrinking huge
images by area averaging, as LibreFace does) instead of LibreFace's 4096 px supersampled PIL quad
transform; padding is constant black, LibreFace's `pad_mode='const'`.
"""

from __future__ import annotations

import cv2
import numpy as np

# The landmark sets LibreFace averages: each eye's contour (16 points) and the outer lip contour,
# whose leftmost and rightmost points are the mouth corners.
SUBJECT_LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398)
SUBJECT_RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
        78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415)

ALIGNED_SIZE = 256
CROP_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def alignment_quad(points: np.ndarray) -> np.ndarray:
    """The oriented square (4 corners, image pixels) that LibreFace crops the face with."""
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
    return np.stack([center - x - y, center - x + y, center + x + y, center + x - y]).astype(np.float32)


def align_face(rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 256x256 aligned face (RGB uint8) LibreFace's network is trained on."""
    quad = alignment_quad(points)
    quad_size = float(np.hypot(*(quad[3] - quad[0])))
    shrink = int(np.floor(quad_size / ALIGNED_SIZE * 0.5))
    if shrink > 1:
        size = (max(1, round(rgb.shape[1] / shrink)), max(1, round(rgb.shape[0] / shrink)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        quad = quad / shrink
    # Corners in order: top-left, bottom-left, bottom-right (see `alignment_quad`).
    target = np.array([[0, 0], [0, ALIGNED_SIZE], [ALIGNED_SIZE, ALIGNED_SIZE]], dtype=np.float32)
    matrix = cv2.getAffineTransform(quad[:3], target)
    return cv2.warpAffine(rgb, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def network_input(aligned: np.ndarray) -> np.ndarray:
    """Centre 224 crop, [0, 1] scaling and ImageNet normalisation; (3, 224, 224) float32."""
    offset = (ALIGNED_SIZE - CROP_SIZE) // 2
    crop = aligned[offset:offset + CROP_SIZE, offset:offset + CROP_SIZE].astype(np.float32) / 255.0
    return ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()
