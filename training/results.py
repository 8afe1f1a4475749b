"""What a finished run leaves: scores per split, predictions per subject, pictures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np

from loader import H5Sequence, Store
from loader.schema import SESSION, SUBJECT_ID
from loader.target import REGRESSION, Target
from training.metrics import (
    class_probabilities,
    evaluate_outputs,
    evaluate_regression,
    subject_predictions,
)
from training.plots import plot_confusions, plot_curves, plot_scatter, read_history

PREDICTION_COLUMNS = (
    "subject", "sessions", "split", "true", "predicted", "probability", "slices",
)  # fmt: skip


def evaluate(
    model: keras.Model, data: dict[str, H5Sequence], store: Store, target: Target
) -> tuple[dict, list[dict]]:
    """Scores on ``val`` and ``test`` by split name, and one prediction row per subject.

    Values and subjects are read through ``store``, the file the sequences read; rows
    whose subject has no value for the target are left out.

    Returns:
        ``(metrics, predictions)``: split -> ``{"slices": ..., "subjects": ...}``, and the
        rows of ``predictions.csv`` (:data:`PREDICTION_COLUMNS`).
    """
    subjects = store.subjects_table()
    results, rows = {}, []
    for key in ("val", "test"):
        if key not in data:
            continue
        sequence = data[key]
        outputs = np.asarray(model.predict(sequence, verbose=0), dtype=np.float64)
        store_rows = np.concatenate([sequence.rows(i) for i in range(len(sequence))])
        start, stop = int(store_rows.min()), int(store_rows.max()) + 1  # one contiguous split
        scans = store.subject[start:stop][store_rows - start]
        keep = target.present[scans]
        outputs, scans = outputs.reshape(len(keep), -1)[keep], scans[keep]
        values, ids = target.values[scans], subjects[SUBJECT_ID][scans]
        if target.task == REGRESSION:
            results[sequence.split] = evaluate_regression(outputs, values, ids)
        else:
            results[sequence.split] = evaluate_outputs(outputs, values, ids)
        rows += _prediction_rows(outputs, scans, subjects, target, sequence.split)
    return results, rows


def _prediction_rows(outputs, scans, subjects, target: Target, split: str) -> list[dict]:
    ids = subjects[SUBJECT_ID][scans]
    averaged = subject_predictions(outputs, ids)
    rows = []
    for subject_id, mean, count in zip(*averaged.values(), strict=True):
        mine = scans[ids == subject_id]
        sessions = sorted(set(subjects[SESSION][mine]))
        value = target.values[mine[0]]
        row = {"subject": subject_id, "sessions": ";".join(s for s in sessions if s)}
        row["split"] = split
        if target.task == REGRESSION:
            row |= {"true": f"{value:g}", "predicted": f"{mean[0]:.4g}", "probability": ""}
        else:
            probabilities = class_probabilities(mean[None, :])[0]
            best = int(np.argmax(probabilities))
            row |= {
                "true": target.class_names[value],
                "predicted": target.class_names[best],
                "probability": f"{probabilities[best]:.4f}",
            }
        rows.append(row | {"slices": int(count)})
    return rows


def write_results(
    run_dir: Path,
    summary: dict,
    metrics: dict,
    predictions: list[dict],
    target: Target,
    monitor: str,
) -> None:
    """``metrics.json``, ``predictions.csv``, ``curves.png``, ``confusion.png`` or ``scatter.png``.

    Args:
        run_dir: the run folder.
        summary: epochs run, best epoch, interrupted, seconds.
        metrics: split -> scores (empty when the run was interrupted).
        predictions: the rows of ``predictions.csv``.
        target: what was predicted.
        monitor: the validation metric early stopping followed (``val_accuracy``, ``val_mae``).
    """
    history = read_history(run_dir / "history.csv")
    if history:
        plot_curves(history, run_dir / "curves.png", summary["best_epoch"], monitor[4:])
    document = {**summary, "target": target.name, "task": target.task}
    if metrics:
        document["splits"] = metrics
        if target.task == REGRESSION:
            points = {}
            for split in metrics:
                mine = [row for row in predictions if row["split"] == split]
                points[split] = (
                    np.array([float(row["true"]) for row in mine]),
                    np.array([float(row["predicted"]) for row in mine]),
                )
            plot_scatter(points, target.name, run_dir / "scatter.png")
        else:
            plot_confusions(metrics, target.class_names, run_dir / "confusion.png")
        with open(run_dir / "predictions.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, PREDICTION_COLUMNS)
            writer.writeheader()
            writer.writerows(predictions)
    (run_dir / "metrics.json").write_text(json.dumps(document, indent=2))
