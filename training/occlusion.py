"""Occlusion maps: how much a model's score falls when each patch of a slice is hidden.

The method (Zeiler & Fergus 2014; compared with gradient maps on MRI classifiers by Rieke
et al. 2018, where it was among the most focused): a square patch of a slice, every
channel, is set to the slice's mean value, position by position, half a patch apart; each
pixel gets the mean fall of the explained score over the patches that hid it. Positive
pixels held evidence for the answer.

Chosen over Grad-CAM and gradients x input because it asks the model for predictions
only: any ``model_fn`` (no named last convolution needed), either backend (no gradient
code per backend), the augmentation and rescaling layers of a run's model included, and
the map is in the score's own units. The mean, not the darkest value (the background):
a dark square is itself a shape a CNN answers to; on a test store whose answer lies in one
bright square, dark patches put 98 % of the map outside it, mean patches 83-87 % inside.
It costs one prediction per patch position (225 a slice for 64 x 64 with the default
8-pixel patch).
"""

from __future__ import annotations

import numpy as np

from loader.target import REGRESSION
from training.metrics import class_probabilities

METHOD = "occlusion"


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Where the patches start along one side: every ``stride`` pixels, and flush with the
    far edge, so every pixel is hidden at least once.

    >>> window_starts(8, 4, 2), window_starts(9, 4, 2)
    ([0, 2, 4], [0, 2, 4, 5])
    """
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_maps(
    score, images: np.ndarray, columns: np.ndarray, patch: int, stride: int | None = None
) -> np.ndarray:
    """How much each pixel's patches lower the score, per image.

    Args:
        score: ``score(x) -> (m, K)`` for images ``x`` of shape ``(m, h, w, C)``.
        images: ``(n, h, w, C)`` float32, as the model reads them (channels last).
        columns: ``(n,)``: the score's column explained for each image.
        patch: the side of the hidden square, pixels.
        stride: pixels between patch positions. Defaults to half a patch.

    Returns:
        float32 ``(n, h, w)``: per pixel, the score minus the score with the pixel hidden,
        averaged over the patch positions that hide it.

    >>> top_left = lambda x: x[:, :2, :2, 0].sum(axis=(1, 2))[:, None]  # reads 4 pixels
    >>> image = np.zeros((1, 4, 4, 1), np.float32); image[0, :2, :2] = 1  # bright there
    >>> maps = occlusion_maps(top_left, image, np.zeros(1, int), 2)
    >>> bool(maps[0, :2, :2].min() > 0), float(maps[0, 3, 3])  # nothing there counts
    (True, 0.0)
    """
    count, height, width, _ = images.shape
    stride = stride or max(1, patch // 2)
    windows = [(r, c) for r in window_starts(height, patch, stride)
               for c in window_starts(width, patch, stride)]  # fmt: skip
    coverage = np.zeros((height, width), np.float32)
    for r, c in windows:
        coverage[r : r + patch, c : c + patch] += 1
    base = score(images)[np.arange(count), columns]
    fill = images.mean(axis=(1, 2), keepdims=True)  # (n, 1, 1, C): the mean value
    maps = np.zeros((count, height, width), np.float32)
    per_call = max(1, 512 // len(windows))  # images whose variants go in one prediction
    for first in range(0, count, per_call):
        chunk = range(first, min(first + per_call, count))
        hidden = np.repeat(images[chunk.start : chunk.stop], len(windows), axis=0)
        for k, i in enumerate(chunk):
            for w, (r, c) in enumerate(windows):
                hidden[k * len(windows) + w, r : r + patch, c : c + patch] = fill[i]
        scores = score(hidden).reshape(len(chunk), len(windows), -1)
        for k, i in enumerate(chunk):
            drops = base[i] - scores[k, :, columns[i]]
            for drop, (r, c) in zip(drops, windows, strict=True):
                maps[i, r : r + patch, c : c + patch] += drop
    return maps / coverage


def scorer(model, task: str, channels: str):
    """``score(x)`` for images ``(m, h, w, C)``: the model's class probabilities
    ``(m, K)``, or its value ``(m, 1)`` for regression; ``channels`` is the model's layout."""

    def score(x: np.ndarray) -> np.ndarray:
        if channels == "first":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        outputs = np.asarray(model.predict_on_batch(x), np.float64)
        if task == REGRESSION:
            return outputs.reshape(len(outputs), -1)
        return class_probabilities(outputs)

    return score
