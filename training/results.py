"""What a finished run leaves: scores per split, predictions per subject, pictures."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import keras
import numpy as np

from loader import H5Sequence, Store, files
from loader.target import REGRESSION, SEGMENTATION, Target
from training import run_folder
from training.data import sequence_facts
from training.metrics import (
    class_probabilities,
    evaluate_outputs,
    evaluate_regression,
    subject_predictions,
)
from training.plots import (
    plot_confusions,
    plot_curves,
    plot_scatter,
    plot_segmentation,
    read_history,
)
from training.segmentation import evaluate_segmentation

PREDICTION_COLUMNS = (
    "subject",
    "sessions",
    "split",
    "true",
    "predicted",
    "probability",
    "slices",
)
SEGMENTATION_COLUMNS = (
    "subject",
    "sessions",
    "split",
    "true_pixels",
    "predicted_pixels",
    "dice",
    "slices",
)


def evaluate(
    model: keras.Model, data: dict[str, H5Sequence], stores: list[Store], targets: list[Target]
) -> tuple[dict, list[dict]]:
    """Scores on ``val`` and ``test`` by split name, and one prediction row per subject.

    Values and subjects are read through ``stores``, the files the sequences read; rows
    whose subject has no value for the target are left out. With several stores a
    subject is named ``<store file stem>/<id>`` (cohorts may reuse ids).

    Returns:
        ``(metrics, predictions, examples)``: split -> ``{"slices": ..., "subjects": ...}``,
        the rows of ``predictions.csv`` (:data:`PREDICTION_COLUMNS`, or
        :data:`SEGMENTATION_COLUMNS`), and for segmentation validation slices to draw.
    """
    target = targets[0]
    results, rows, examples = {}, [], {}
    for key in ("val", "test"):
        if key not in data:
            continue
        sequence = data[key]
        if target.task == SEGMENTATION:
            results[sequence.split], more, found = evaluate_segmentation(
                model, sequence, stores, targets
            )
            rows += more
            examples = examples or found  # validation's
            continue
        outputs = np.asarray(model.predict(sequence, verbose=0), dtype=np.float64)
        facts = sequence_facts(sequence, stores, targets)
        keep = facts["present"]
        outputs = outputs.reshape(len(keep), -1)[keep]
        values, ids, sessions = (facts[name][keep] for name in ("values", "ids", "sessions"))
        if target.task == REGRESSION:
            results[sequence.split] = evaluate_regression(outputs, values, ids)
        else:
            results[sequence.split] = evaluate_outputs(outputs, values, ids)
        rows += _prediction_rows(outputs, values, ids, sessions, target, sequence.split)
    return results, rows, examples


def _prediction_rows(outputs, values, ids, sessions, target: Target, split: str) -> list[dict]:
    averaged = subject_predictions(outputs, ids)
    rows = []
    for subject_id, mean, count in zip(
        averaged["subject"], averaged["mean"], averaged["slices"], strict=True
    ):
        mine = ids == subject_id
        value = values[mine][0]
        found = sorted({s for s in sessions[mine] if s})
        row = {"subject": subject_id, "sessions": ";".join(found), "split": split}
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
    examples: dict | None = None,
) -> None:
    """``metrics.json``, ``predictions.csv``, ``curves.png``, and ``confusion.png``,
    ``scatter.png`` or ``segmentation.png``.

    Args:
        run_dir: the run folder.
        summary: epochs run, best epoch, interrupted, seconds.
        metrics: split -> scores (empty when the run was interrupted).
        predictions: the rows of ``predictions.csv``.
        target: what was predicted.
        monitor: the validation metric early stopping followed (``val_accuracy``, ``val_mae``,
            ``val_dice``).
        examples: segmentation's validation slices, true and predicted masks.
    """
    history = read_history(run_dir / run_folder.HISTORY)
    if history:
        plot_curves(history, run_dir / run_folder.CURVES, summary["best_epoch"], monitor[4:])
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
            plot_scatter(points, target.name, run_dir / run_folder.SCATTER)
        elif target.task == SEGMENTATION:
            if examples:
                plot_segmentation(examples, run_dir / run_folder.SEGMENTATION_PICTURE)
        else:
            plot_confusions(metrics, target.class_names, run_dir / run_folder.CONFUSION)
        text = io.StringIO(newline="")
        columns = SEGMENTATION_COLUMNS if target.task == SEGMENTATION else PREDICTION_COLUMNS
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(predictions)
        files.write_text(run_dir / run_folder.PREDICTIONS, text.getvalue())
    files.write_text(run_dir / run_folder.METRICS, json.dumps(document, indent=2))
