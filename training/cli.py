"""Train and evaluate a CNN on a store's splits, leaving a complete run folder.

RUN_DIR gets model.keras (best weights), history.csv, metrics.json (slice- and
subject-level), config.json (settings, library versions, the store's path, uuid and
preprocessing config), curves.png and confusion.png.
Exit status: 0 when done, 2 for usage errors or an unusable store, 130 when interrupted
(the folder then holds the best model and the history so far).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO lines are noise here

from training.run import TrainingError, train


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", metavar="STORE", help="a labelled store from python -m preprocess")
    parser.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="the run folder")
    parser.add_argument(
        "--epochs", type=int, default=100, help="at most this many epochs (default: 100)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="slices per batch (default: 256)"
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=10,
        help="stop after this many epochs without a better val_accuracy (default: 10)",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="Adam's learning rate (default: 0.001)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and the batch order (default: 0)"
    )
    parser.add_argument(
        "--train-split",
        nargs="+",
        default=["train"],
        metavar="SPLIT",
        help="split(s) to train on, e.g. fold0 fold1 fold2 (default: train)",
    )
    parser.add_argument(
        "--val-split",
        default="val",
        metavar="SPLIT",
        help="split for early stopping and validation (default: val)",
    )
    parser.add_argument(
        "--test-split",
        metavar="SPLIT",
        help="split to test on (default: test when the store has one)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="threads (or processes) that read batches (default: 1)",
    )
    parser.add_argument(
        "--multiprocessing",
        action="store_true",
        help="read batches in processes instead of threads",
    )
    parser.add_argument(
        "--channels",
        choices=("last", "first"),
        default="last",
        help="tensor layout (default: last)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run in an existing RUN_DIR"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m training``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        result = train(
            args.store, args.output, overwrite=args.overwrite, epochs=args.epochs,
            batch_size=args.batch_size, patience=args.patience, learning_rate=args.learning_rate,
            seed=args.seed, train_split=tuple(args.train_split), val_split=args.val_split,
            test_split=args.test_split, workers=args.workers,
            use_multiprocessing=args.multiprocessing, channels=args.channels,
        )  # fmt: skip
    except (TrainingError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return 130
    run_dir = result.run_dir
    if result.interrupted:
        print(
            f"interrupted after {result.epochs_run} epoch(s); {run_dir} holds the best model "
            "so far and the history",
            file=sys.stderr,
        )
        return 130
    print(f"run folder: {run_dir} ({result.epochs_run} epochs, best epoch {result.best_epoch})")
    for split, results in result.metrics.items():
        slices, subjects = results["slices"], results["subjects"]
        auc = f", ROC AUC {slices['roc_auc']:.3f}" if slices["roc_auc"] is not None else ""
        print(
            f"{split}: slice accuracy {slices['accuracy']:.3f} ({slices['count']} slices){auc}; "
            f"subject accuracy {subjects['accuracy']:.3f} ({subjects['count']} subjects)"
        )
    print(f"pictures: {run_dir / 'curves.png'}, {run_dir / 'confusion.png'}")
    return 0
