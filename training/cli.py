"""Train and evaluate a CNN on a store's splits, leaving a complete run folder.

Any column of the store's labels table can be the target (--target): text columns are
classes, numbers a regression. RUN_DIR gets model.keras (best weights), history.csv,
metrics.json (slice- and subject-level), predictions.csv (one row per subject),
config.json (settings, the target, library versions, the stores read), curves.png, and
confusion.png (classes) or scatter.png (regression).
A checkpoint at every epoch end (and every --checkpoint-every N batches) lets --resume
continue a killed run where it stopped, ending as the uninterrupted run would have.
Exit status: 0 when done, 2 for usage errors or an unusable store, 130 when interrupted
by Ctrl-C or SIGTERM (the batch finishes, a checkpoint is written; the folder holds the
best model and the history so far).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# Before TensorFlow loads: hide its INFO and WARNING lines; errors that matter reach the
# user as Python exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# and use its oneDNN kernels on every x86 CPU: TensorFlow turns them on by itself only on
# CPUs with AVX-512 VNNI, BF16 or AMX; on an AMD EPYC with AVX2 (2 cores) they halve a
# training step (the CNN on 32 slices of 64 x 64: 220 -> 101 ms; the U-Net on 32 x 32 x 2:
# 345 -> 119 ms). TF_ENABLE_ONEDNN_OPTS=0 turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send what C++ code writes to stderr (fd 2) to /dev/null for a while.

    TensorFlow's start-up lines (absl's "before InitializeLog", oneDNN, and "failed call
    to cuInit" on a machine without a GPU) come from C++ before any setting applies.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _tensorflow_left_out() -> None:
    """Tell Keras, in this process only, that TensorFlow is not there.

    Keras imports TensorFlow where it is installed, under any backend: to seed it
    (``keras.utils.set_random_seed``) and to recognise its objects when it saves a model.
    Nothing a run does on JAX uses it (the TensorBoard logs import it themselves,
    :mod:`training.tensorboard`), and the import cost a JAX run 3-5 s and ~450 MB before
    its first step (two epochs on a small store: 12.3-12.6 s and 730-780 MB, against
    15.5-17.1 s and 1.2 GB). The command owns its process; the Python API
    (``training.train``) leaves Keras as the caller has it. Keras' lazy module is private:
    where it changes, TensorFlow is imported as before.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from keras.src.utils import module_utils

        if module_utils.tensorflow._available is None:
            module_utils.tensorflow._available = False


with _native_stderr_silenced():  # load the backend and probe its devices, quietly
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.list_physical_devices()
    else:
        _tensorflow_left_out()

from loader.exits import resume_command, run_main  # noqa: E402
from loader.options import add_options, settings_from_args  # noqa: E402
from training import run_folder  # noqa: E402
from training.run import train  # noqa: E402
from training.settings import Settings  # noqa: E402


def _parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and setting name -> flag."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "store",
        nargs="+",
        metavar="STORE",
        help="a store from python -m preprocess; several stores, or a folder of them, read as one",
    )
    parser.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="the run folder")
    flags = add_options(parser, Settings)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run in an existing RUN_DIR"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR from its last checkpoint (same options); start it "
        "when RUN_DIR holds none",
    )
    return parser, flags


def _plural(count: int, noun: str) -> str:
    """
    >>> _plural(1, "epoch"), _plural(3, "epoch")
    ('1 epoch', '3 epochs')
    """
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _scores(scores: dict) -> str:
    """One split's scores at one level, for the console.

    >>> _scores({"count": 4, "mae": 2.5, "rmse": 3.0, "r": 0.9})
    'MAE 2.5, RMSE 3, r 0.900 (4)'
    >>> _scores({"count": 9, "accuracy": 0.75, "roc_auc": None})
    'accuracy 0.750 (9)'
    """
    if "mean_dice" in scores:
        value = scores["mean_dice"]
        return f"Dice {value:.3f}" if value is not None else "Dice n/a (no mask anywhere)"
    if "mae" in scores:
        r = f", r {scores['r']:.3f}" if scores["r"] is not None else ""
        return f"MAE {scores['mae']:.4g}, RMSE {scores['rmse']:.4g}{r} ({scores['count']})"
    auc = f", ROC AUC {scores['roc_auc']:.3f}" if scores.get("roc_auc") is not None else ""
    return f"accuracy {scores['accuracy']:.3f}{auc} ({scores['count']})"


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m training`` (or its ``predict``, ``explain``, ``compare``); returns the
    exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"predict": predict_main, "explain": explain_main, "compare": compare_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    parser, flags = _parser()

    def body(args: argparse.Namespace) -> int:
        settings = settings_from_args(Settings, args)
        stores = args.store[0] if len(args.store) == 1 else args.store
        result = train(
            stores, args.output, overwrite=args.overwrite, resume=args.resume, **vars(settings)
        )
        run_dir = result.run_dir
        index, count = result.process
        if index > 0:
            print(f"process {index} of {count}: done; process 0 wrote the run folder")
            return 130 if result.interrupted else 0
        if result.interrupted:
            print(
                f"interrupted after {_plural(result.epochs_run, 'epoch')}; {run_dir} holds the "
                f"best model so far, the history and a checkpoint; continue with: "
                f"{resume_command('training', argv)}",
                file=sys.stderr,
            )
            return 130
        print(
            f"run folder: {run_dir} ({_plural(result.epochs_run, 'epoch')}, "
            f"best epoch {result.best_epoch})"
        )
        for split, results in result.metrics.items():
            print(
                f"{split}: {_scores(results['slices'])} per slice; "
                f"{_scores(results['subjects'])} per subject"
            )
        pictures = [p for p in run_folder.PICTURES if (run_dir / p).is_file()]
        print(f"pictures: {', '.join(str(run_dir / p) for p in pictures)}")
        print(f"predictions per subject: {run_dir / run_folder.PREDICTIONS}")
        return 0

    return run_main(
        parser, argv, body, flags, interrupt_hint=lambda args: " before training started"
    )


def _predict_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser of ``python -m training predict`` (and no settings' flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m training predict",
        description="Apply a run's best model to new scans, preprocessed by the same code and "
        "settings as the store it was trained on; segmentations are written on each scan's "
        "own grid. Exit status: 0 when every scan was predicted, 1 when some were rejected, "
        "2 for usage errors or when nothing could be predicted (nothing written).",
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a run folder of python -m training")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the folder to write")
    parser.add_argument(
        "--labels", metavar="FILE", help="a .tsv or .csv of true values: adds scores"
    )
    parser.add_argument(
        "--probabilities", action="store_true", help="segmentation: also each label's map"
    )
    parser.add_argument(
        "--workers", type=int, metavar="N", help="processes that compute slices (CPUs, at most 8)"
    )
    parser.add_argument(
        "--id-salt",
        metavar="SECRET",
        help="DICOM inputs: the secret naming subjects, as preprocess's --id-salt "
        "(default: $SLICESTORE_ID_SALT)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser, {}


def predict_main(argv: list[str]) -> int:
    """Run ``python -m training predict``; returns the exit status."""
    from training.inference import predict

    def body(args: argparse.Namespace) -> int:
        result = predict(
            args.run,
            args.inputs,
            args.output,
            labels=args.labels,
            overwrite=args.overwrite,
            probabilities=args.probabilities,
            workers=args.workers,
            report=lambda line: print(line, file=sys.stderr),
            id_salt=args.id_salt,
        )
        print(
            f"wrote {result.output} in {result.seconds:.1f} s: {len(result.scans)} scans of "
            f"{len(result.subjects)} subjects predicted, {len(result.rejected)} rejected"
            + (f", {len(result.seen)} seen in training" if result.seen else "")
            + (f", {len(result.check)} to check (registration)" if result.check else "")
        )
        if result.metrics:
            print(
                f"scores: {_scores(result.metrics['slices'])} per slice; "
                f"{_scores(result.metrics['subjects'])} per subject"
            )
        return 1 if result.rejected else 0

    return run_main(_predict_parser()[0], argv, body)


def _explain_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m training explain``."""
    parser = argparse.ArgumentParser(
        prog="python -m training explain",
        description="Occlusion maps of a run's best model: for each subject of a split, how "
        "much hiding each patch of each slice lowers the probability of the subject's class "
        "(or the predicted value), drawn over the slices and saved as numbers; and the maps "
        "averaged per class (per third of the target for regression) at each slice "
        "position. Exit status: 0 when done, 2 for usage errors (nothing written).",
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a run folder of python -m training")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the folder to write")
    parser.add_argument(
        "--split",
        default="val",
        metavar="SPLIT",
        help="the split whose subjects are explained (default: val)",
    )
    parser.add_argument(
        "--subjects", nargs="+", metavar="ID", help="only these subjects (default: the split's)"
    )
    parser.add_argument(
        "--patch", type=int, metavar="N", help="side of the hidden square (default: slice / 8)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def explain_main(argv: list[str]) -> int:
    """Run ``python -m training explain``; returns the exit status."""
    from training.explain import explain

    def body(args: argparse.Namespace) -> int:
        result = explain(
            args.run,
            args.output,
            split=args.split,
            subjects=args.subjects,
            patch=args.patch,
            overwrite=args.overwrite,
        )
        groups = ", ".join(f"{name} ({len(ids)})" for name, ids in result.groups.items())
        print(
            f"wrote {result.output} in {result.seconds:.1f} s: maps of "
            f"{_plural(len(result.subjects), 'subject')}; groups: {groups}"
        )
        if result.approximate:
            print(
                "note: a native-space store: slice k is not the same anatomy in every "
                "subject, so the group averages are approximate (--space mni makes them exact)"
            )
        return 0

    return run_main(_explain_parser(), argv, body)


def _compare_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m training compare``."""
    parser = argparse.ArgumentParser(
        prog="python -m training compare",
        description="One table of runs: store, target, splits, the settings that differ, "
        "best epoch, validation and test scores per slice and per subject, time; as text, "
        "as compare.csv and with the validation curves side by side in compare.png. Exit "
        "status: 0 when done, 2 for usage errors.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding run folders"
    )
    parser.add_argument(
        "-o",
        "--output",
        default=".",
        metavar="DIR",
        help="where compare.csv and compare.png go (default: the current folder)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    return parser


def compare_main(argv: list[str]) -> int:
    """Run ``python -m training compare``; returns the exit status."""
    from training.compare import compare, format_table

    def body(args: argparse.Namespace) -> int:
        result = compare(args.runs, args.output, overwrite=args.overwrite)
        print(format_table(result))
        for line in result.notes:
            print(line)
        print(f"wrote {result.table} and {result.picture}")
        return 0

    return run_main(_compare_parser(), argv, body)
