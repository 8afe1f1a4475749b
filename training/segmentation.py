"""Segmentation: the Dice + cross-entropy loss, the Dice metric, and the scores of a split.

Masks are integer labels, ``(b, h, w, 1)``; the model's output is a softmax over the
labels at every pixel, ``(b, h, w, K)``. Dice of a label is ``2|P & T| / (|P| + |T|)``
over the pixels predicted (``P``, the most probable label) and true (``T``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from loader import H5Sequence, Store
from loader.sequence import model_input
from loader.target import Target
from training.data import row_facts

SMOOTH = 1.0  # keeps the soft Dice of an empty label and batch at 1, its gradient finite


@keras.saving.register_keras_serializable(package="slicestore")
def dice_cross_entropy(y_true, y_pred):
    """Cross-entropy balanced over the labels plus one minus the soft Dice of the labels
    other than 0.

    The cross-entropy is averaged per label over its pixels in the batch, then over the
    labels present: a lesion's few pixels weigh as much as the background's many. With the
    plain mean over pixels a U-Net first learned "no lesion anywhere" and left it late and
    by chance (the phantom lesions, seed 0: val Dice 0.00 for three epochs, then 0.50; with
    other float rounding 0.002 after four); balanced, it finds them from the first epochs
    (0.07, 0.31, 0.59, 0.63, ..., 0.85 after eight, as the plain mean reached). The Dice
    term keeps the segmentation from spilling over the background.

    >>> y = np.zeros((1, 2, 2, 1), np.int32); y[0, 0, 0, 0] = 1
    >>> p = np.stack([1.0 - y[..., 0], y[..., 0]], -1).astype("float32") * 0.98 + 0.01
    >>> round(float(dice_cross_entropy(y, p)), 3)  # nearly right: CE 0.010, 1 - Dice 0.013
    0.023
    """
    labels = ops.cast(ops.squeeze(y_true, -1), "int32")
    classes = ops.shape(y_pred)[-1]
    pixel_loss = keras.losses.sparse_categorical_crossentropy(labels, y_pred)
    every = ops.one_hot(labels, classes)
    counts = ops.sum(every, axis=(0, 1, 2))
    per_label = ops.sum(every * pixel_loss[..., None], axis=(0, 1, 2)) / ops.maximum(counts, 1)
    present = ops.cast(counts > 0, y_pred.dtype)
    cross_entropy = ops.sum(per_label * present) / ops.sum(present)
    one_hot = every[..., 1:]
    probabilities = y_pred[..., 1:]
    overlap = ops.sum(one_hot * probabilities, axis=(0, 1, 2))
    total = ops.sum(one_hot, axis=(0, 1, 2)) + ops.sum(probabilities, axis=(0, 1, 2))
    dice = (2 * overlap + SMOOTH) / (total + SMOOTH)
    return cross_entropy + 1 - ops.mean(dice)


@keras.saving.register_keras_serializable(package="slicestore")
class Dice(keras.metrics.Metric):
    """Mean Dice of the labels other than 0, over every pixel of the epoch (hard labels)."""

    def __init__(self, num_classes: int, name: str = "dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        size = max(num_classes - 1, 1)
        self.overlap = self.add_variable(shape=(size,), initializer="zeros", name="overlap")
        self.total = self.add_variable(shape=(size,), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(ops.squeeze(y_true, -1), "int32")
        predicted = ops.argmax(y_pred, axis=-1)
        true = ops.one_hot(labels, self.num_classes)[..., 1:]
        guess = ops.one_hot(predicted, self.num_classes)[..., 1:]
        self.overlap.assign_add(ops.sum(true * guess, axis=(0, 1, 2)))
        self.total.assign_add(ops.sum(true, axis=(0, 1, 2)) + ops.sum(guess, axis=(0, 1, 2)))

    def result(self):
        return ops.mean(2 * self.overlap / ops.maximum(self.total, 1.0))

    def reset_state(self):
        for variable in (self.overlap, self.total):  # zeros of its shape: on every backend
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def dice(overlap: np.ndarray, total: np.ndarray) -> list[float | None]:
    """Dice per label from pixel counts; None where neither truth nor prediction has it.

    >>> dice(np.array([3, 0]), np.array([8, 0]))
    [0.75, None]
    """
    return [float(2 * o / t) if t else None for o, t in zip(overlap, total, strict=True)]


def evaluate_segmentation(
    model: keras.Model, sequence: H5Sequence, stores: list[Store], targets: list[Target]
) -> tuple[dict, list[dict], dict]:
    """Dice of one split, batch by batch (the split is never held whole).

    Returns:
        ``(scores, rows, examples)``: ``{"slices": {"loss", "dice", "mean_dice"},
        "subjects": {"dice", "mean_dice", "count"}}`` where slice level pools every pixel
        of the split and subject level averages each subject's Dice over all its slices;
        one row per subject for ``predictions.csv``; and the validation slices with the most
        true foreground (``image``, ``true``, ``predicted``) for the picture.
    """
    class_names = targets[0].class_names
    tally = DiceTally(len(class_names))
    for index in range(len(sequence)):
        x, y = sequence[index]
        probabilities = np.asarray(model.predict_on_batch(x))
        if sequence.output == "stored":  # the pictures show intensities
            x = model_input(x, sequence.scale, sequence.offset)
        tally.add(x, y, probabilities, row_facts(sequence.rows(index), stores, targets))
    scores = tally.scores(class_names[1:], sequence.num_slices)
    return scores, tally.rows(sequence.split), tally.pictures()


class DiceTally:
    """Pixels predicted, true and both, per label, pooled and per subject, batch by batch;
    the loss; and the few slices with the most true foreground.

    Args:
        num_classes: labels of the masks, background (0) included.
        examples: how many slices to keep for the picture.
    """

    def __init__(self, num_classes: int, examples: int = 8):
        self.labels = np.arange(1, num_classes)
        self.overlap, self.total = np.zeros(len(self.labels)), np.zeros(len(self.labels))
        self.per_subject: dict[str, dict] = {}
        self.loss = 0.0
        self.keep = examples
        self.examples = []  # (true area, image, true, predicted): the largest few only

    def add(self, x, y, probabilities: np.ndarray, facts: dict) -> None:
        """One batch: images, true masks ``(b, h, w, 1)``, softmax outputs, row facts."""
        self.loss += float(dice_cross_entropy(y, probabilities)) * len(x)
        predicted = probabilities.argmax(-1)
        true = y[..., 0].astype(np.int64)
        # per row and label: pixels in both, and pixels predicted plus true
        hit = predicted[..., None] == self.labels
        want = true[..., None] == self.labels
        both = (hit & want).sum(axis=(1, 2))
        sums = hit.sum(axis=(1, 2)) + want.sum(axis=(1, 2))
        self.overlap += both.sum(axis=0)
        self.total += sums.sum(axis=0)
        for subject in np.unique(facts["ids"]):
            mine = facts["ids"] == subject
            entry = self.per_subject.setdefault(subject, self._new_subject())
            entry["overlap"] += both[mine].sum(axis=0)
            entry["total"] += sums[mine].sum(axis=0)
            entry["sessions"].update(s for s in facts["sessions"][mine] if s)
            entry["slices"] += int(mine.sum())
            entry["true"] += int((true[mine] > 0).sum())
            entry["predicted"] += int((predicted[mine] > 0).sum())
        area = (true > 0).sum(axis=(1, 2))
        found = [(area[r], x[r], true[r], predicted[r]) for r in np.argsort(area)[-self.keep :]]
        self.examples = sorted(self.examples + found, key=lambda e: -e[0])[: self.keep]

    def _new_subject(self) -> dict:
        zeros = np.zeros(len(self.labels))
        fields = {"overlap": zeros, "total": zeros.copy(), "sessions": set()}
        return fields | {"slices": 0, "true": 0, "predicted": 0}

    def scores(self, names: list[str], num_slices: int) -> dict:
        """Slice level pools every pixel; subject level averages each subject's Dice."""
        pooled = dice(self.overlap, self.total)
        subject_scores = [dice(e["overlap"], e["total"]) for e in self.per_subject.values()]
        mean_per_label = []
        for label in range(len(self.labels)):
            values = [s[label] for s in subject_scores if s[label] is not None]
            mean_per_label.append(float(np.mean(values)) if values else None)
        return {
            "slices": {
                "loss": self.loss / max(num_slices, 1),
                "dice": dict(zip(names, pooled, strict=True)),
                "mean_dice": _mean(pooled),
            },
            "subjects": {
                "count": len(self.per_subject),
                "dice": dict(zip(names, mean_per_label, strict=True)),
                "mean_dice": _mean(mean_per_label),
            },
        }

    def rows(self, split: str) -> list[dict]:
        """One row per subject for ``predictions.csv``."""
        rows = []
        for subject, entry in self.per_subject.items():
            value = _mean(dice(entry["overlap"], entry["total"]))
            rows.append(
                {
                    "subject": subject,
                    "sessions": ";".join(sorted(entry["sessions"])),
                    "split": split,
                    "true_pixels": entry["true"],
                    "predicted_pixels": entry["predicted"],
                    "dice": "" if value is None else f"{value:.4f}",
                    "slices": entry["slices"],
                }
            )
        return rows

    def pictures(self) -> dict:
        """The kept slices: ``image``, ``true`` and ``predicted`` lists."""
        return {
            key: [example[position] for example in self.examples]
            for position, key in enumerate(("image", "true", "predicted"), start=1)
        }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
