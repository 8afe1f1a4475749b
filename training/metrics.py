"""Scores of a model's slice probabilities: per slice, and per subject (slices averaged)."""

from __future__ import annotations

import keras
import numpy as np
from scipy import stats


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """``(n, K)`` class probabilities from a model's outputs (one sigmoid unit means K = 2).

    >>> class_probabilities(np.array([[0.25]])).tolist()
    [[0.75, 0.25]]
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 1 or outputs.shape[1] == 1:
        positive = outputs.reshape(-1)
        return np.stack([1 - positive, positive], axis=1)
    return outputs


def subject_predictions(outputs: np.ndarray, subject_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Each subject's average output (class probabilities, or a value) and slice count.

    Returns ``subject`` (sorted ids), ``mean`` (one row per subject), ``slices`` (count per
    subject) and ``index`` (the subject of each slice, into ``subject``).

    >>> subject_predictions(np.array([[0.2], [0.4], [0.9]]), np.array(["a", "a", "b"]))["mean"]
    array([[0.3],
           [0.9]])
    """
    outputs = np.asarray(outputs, dtype=np.float64).reshape(len(subject_ids), -1)
    subjects, index = np.unique(np.asarray(subject_ids), return_inverse=True)
    counts = np.bincount(index, minlength=len(subjects))
    mean = (
        np.stack(
            [np.bincount(index, weights=column, minlength=len(subjects)) for column in outputs.T],
            axis=1,
        )
        / counts[:, None]
    )
    return {"subject": subjects, "mean": mean, "slices": counts, "index": index}


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, the confusion matrix and, for two classes, ROC AUC.

    Args:
        probabilities: ``(n, K)`` class probabilities.
        labels: ``(n,)`` true class indices.

    Returns:
        ``count``, ``accuracy``, ``confusion`` (rows: true class, columns: predicted) and
        ``roc_auc`` (None unless two classes and both present).
    """
    num_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    result = {
        "count": len(labels),
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else None,
        "confusion": confusion.reshape(num_classes, num_classes).tolist(),
        "roc_auc": None,
    }
    positive, negative = probabilities[labels == 1, 1], probabilities[labels == 0, 1]
    if num_classes == 2 and len(positive) and len(negative):
        u_statistic = stats.mannwhitneyu(positive, negative).statistic  # AUC = U / (n1 n0)
        result["roc_auc"] = float(u_statistic / (len(positive) * len(negative)))
    return result


def evaluate_outputs(outputs: np.ndarray, labels: np.ndarray, subject_ids: np.ndarray) -> dict:
    """Slice-level and subject-level results of one split.

    Subject level: each subject's slice probabilities are averaged and that average is
    scored against the subject's label, as a reader of whole scans would.

    Args:
        outputs: the model's outputs for the split's slices.
        labels: true class per slice.
        subject_ids: subject per slice (sessions of one subject count as one).

    Returns:
        ``slices``: ``loss`` (the model's own loss) and :func:`scores`;
        ``subjects``: :func:`scores`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    outputs = np.asarray(outputs, dtype=np.float32).reshape(len(labels), -1)
    probabilities = class_probabilities(outputs)
    if outputs.shape[1] == 1:  # one sigmoid unit
        losses = keras.losses.binary_crossentropy(labels[:, None].astype(np.float32), outputs)
    else:
        losses = keras.losses.sparse_categorical_crossentropy(labels, outputs)
    slices = {
        "loss": float(np.mean(keras.ops.convert_to_numpy(losses))),
        **scores(probabilities, labels),
    }
    per_subject = subject_predictions(probabilities, subject_ids)
    index = per_subject["index"]
    subject_labels = np.array(
        [np.bincount(labels[index == s]).argmax() for s in range(len(per_subject["subject"]))],
        dtype=np.int64,
    )
    return {"slices": slices, "subjects": scores(per_subject["mean"], subject_labels)}


def regression_scores(predicted: np.ndarray, true: np.ndarray) -> dict:
    """Count, mean absolute error, root mean squared error and Pearson's r.

    >>> regression_scores(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 3.0]))["mae"]
    0.6666666666666666
    """
    error = predicted - true
    spread = len(true) > 1 and np.std(predicted) > 0 and np.std(true) > 0
    return {
        "count": len(true),
        "mae": float(np.mean(np.abs(error))) if len(true) else None,
        "rmse": float(np.sqrt(np.mean(error**2))) if len(true) else None,
        "r": float(np.corrcoef(predicted, true)[0, 1]) if spread else None,
    }


def evaluate_regression(outputs: np.ndarray, values: np.ndarray, subject_ids: np.ndarray) -> dict:
    """Slice-level and subject-level regression results of one split.

    Subject level: each subject's slice predictions are averaged and compared with the
    subject's value.

    Args:
        outputs: the model's predictions for the split's slices, in the target's units.
        values: the true value per slice.
        subject_ids: subject per slice.

    Returns:
        ``slices``: ``loss`` (mean squared error) and :func:`regression_scores`;
        ``subjects``: :func:`regression_scores`.
    """
    predicted = np.asarray(outputs, dtype=np.float64).reshape(-1)
    values = np.asarray(values, dtype=np.float64)
    slices = {
        "loss": float(np.mean((predicted - values) ** 2)),
        **regression_scores(predicted, values),
    }
    averaged = subject_predictions(predicted, subject_ids)["mean"][:, 0]
    truth = subject_predictions(values, subject_ids)["mean"][:, 0]
    return {"slices": slices, "subjects": regression_scores(averaged, truth)}
