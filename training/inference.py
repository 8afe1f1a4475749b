"""Apply a trained model to new scans, through the same preprocessing code it was trained on.

Every scan goes through ``preprocess.workers.processed`` (the workers of
``python -m preprocess``) with the preprocessing settings of the store the run read, in
memory, then through the run's best model; slice outputs are combined per subject as
evaluation combines them. Segmentations are put back on each scan's own voxel grid: the
class probabilities go back through the slice resampling, the registration (``--space
mni``) and the reorientation, and the most probable label is taken last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
from nibabel import orientations
from tqdm import tqdm

import training.model
import training.segmentation  # noqa: F401
from loader import files, open_store, schema
from loader.sequence import model_input
from loader.target import REGRESSION, SEGMENTATION
from preprocess.find import find_scans
from preprocess.settings import RunOptions
from preprocess.settings import Settings as PreprocessSettings
from preprocess.slices import AXES, unslice
from preprocess.standard import (
    CHECK_FLOOR,
    OLD_TEMPLATE,
    check_line,
    from_template,
    load_template,
)
from preprocess.workers import processed
from training import run_folder
from training.errors import TrainingError
from training.metrics import (
    class_probabilities,
    evaluate_outputs,
    evaluate_regression,
    subject_predictions,
)
from training.plots import plot_written_back

SCANS = "scans.csv"
PICTURE = "segmentations.png"
SEGMENTATION_ENDING = "_pred.nii.gz"
PROBABILITIES_ENDING = "_prob.nii.gz"
# Preprocessing settings a prediction does not take from the store: they choose scans,
# labels and splits, not what a slice is.
NOT_FROM_STORE = ("labels", "label_column", "shard", "shard_count", "masks", "masks_suffix")


@dataclass
class Prediction:
    """What ``predict`` did.

    Attributes:
        output: the folder written.
        subjects: one dict per subject (the rows of ``predictions.csv``).
        scans: one dict per scan (the rows of ``scans.csv``).
        rejected: ``(path, reason)`` of scans preprocessing left out.
        seen: paths of scans that were in the store the model was trained on.
        check: ``(path, similarity)`` of standard-space scans whose registration is below
            the check floor (as ``python -m preprocess`` lists them under ``check
            registration``).
        metrics: the scores with ``labels`` (as evaluation scores a split), else empty.
    """

    output: Path
    subjects: list[dict] = field(default_factory=list)
    scans: list[dict] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    check: list[tuple[str, float]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def predict(
    run_dir: str | os.PathLike,
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    overwrite: bool = False,
    probabilities: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
    report=print,
    id_salt: str | None = None,
) -> Prediction:
    """Predict new scans with a run's best model.

    Args:
        run_dir: a run folder of ``python -m training``.
        inputs: NIfTI files or folders, as ``python -m preprocess`` takes them.
        output: the folder to write (``predictions.csv``, ``scans.csv``, segmentations).
        labels: a table of the subjects' true values (``participants.tsv`` of BIDS inputs
            otherwise, when it has the run's target column): adds ``true`` and ``metrics.json``.
        overwrite: replace an existing ``output``.
        probabilities: for segmentation, also write each label's probability map.
        workers: processes that compute slices. Defaults to preprocess's default.
        progress: a progress bar over the scans; None shows one on a terminal.
        report: called with each line about a rejected scan or a warning.
        id_salt: the secret naming DICOM inputs' subjects, as ``python -m preprocess
            --id-salt`` takes it. Defaults to ``$SLICESTORE_ID_SALT``.

    Raises:
        TrainingError: not a run folder, a model that does not fit the store's settings,
            no usable scan.
        FileExistsError: ``output`` exists and not ``overwrite``.
    """
    started = time.perf_counter()
    run_dir, output = Path(run_dir), Path(output)
    config = read_run(run_dir)
    store = run_folder.stores_read(config)[0]
    settings = preprocess_settings(store["config"], labels)
    channels = config["settings"].get("channels", "last")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; use --overwrite to replace it")
    model = load_run_model(run_dir, settings, channels)
    try:
        found = find_scans([str(i) for i in inputs], settings, report, id_salt)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    with contextlib.closing(found):  # DICOM series' images, converted for this prediction
        options = RunOptions() if workers is None else RunOptions(workers=workers)
        result = _predict_found(
            found, model, settings, config, output, labels, options,
            progress=progress, report=report, probabilities=probabilities,
        )  # fmt: skip
        result.seconds = time.perf_counter() - started  # start-up included
        return result


def _predict_found(
    found, model, settings, config, output, labels, options, *, progress, report, probabilities
) -> Prediction:
    """Predict the scans found; write ``output``."""
    store = run_folder.stores_read(config)[0]
    target = config["target"]
    channels = config["settings"].get("channels", "last")
    known, splits = _training_scans(store, report)
    result = Prediction(output)
    for path, reason in found.rejected:
        result.rejected.append((path, reason))
        report(f"rejected: {path}: {reason}")
    partial = files.fresh_folder(output)
    try:
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=len(found.scans), unit="scan", disable=not show, file=sys.stderr)
        say = bar.write if show else report
        answers = _Answers(model, settings, target, channels, known, partial, probabilities, say)
        pairs = processed(found.scans, settings, options)
        with bar, contextlib.closing(pairs):  # an error here cancels the workers' scans
            for scan, computed in pairs:
                bar.update()
                if isinstance(computed, str):
                    result.rejected.append((scan.shown, computed))
                    say(f"rejected: {scan.shown}: {computed}")
                else:
                    answers.add(scan, computed[0], computed[1], result)
        if not result.scans:
            raise TrainingError(
                f"no usable scans: all {len(result.rejected)} were rejected; nothing written"
            )
        column = target["name"] or store["config"].get("label_column")  # None: the store's
        truth = _true_values(found.participants, column, labels)
        result.subjects, result.metrics = _per_subject(answers, target, splits, truth)
        _write_tables(partial, result, target)
        if answers.examples:
            plot_written_back([example[1:] for example in answers.examples], partial / PICTURE)
        files.publish_folder(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


@dataclass
class _Answers:
    """The model's outputs, gathered scan by scan; segmentations are written as they come."""

    model: keras.Model
    settings: PreprocessSettings
    target: dict
    channels: str
    known: dict[str, str]  # sha256 -> split of the training store's scans
    folder: Path
    probabilities: bool
    say: object
    outputs: list[np.ndarray] = field(default_factory=list)
    facts: list[tuple] = field(default_factory=list)  # (scan, record)
    examples: list[tuple] = field(default_factory=list)  # for the picture

    def add(self, scan, record: dict, slices: np.ndarray, result: Prediction) -> None:
        """Predict one scan's slices; its row in ``result.scans``."""
        stored = slices if slices.ndim == 4 else slices[..., None]
        x = model_input(stored, schema.intensity_scale(self.settings.dtype), 0.0, self.channels)
        answer = np.asarray(self.model.predict(x, batch_size=64, verbose=0), dtype=np.float64)
        seen = self.known.get(record["sha256"])
        if seen is not None:
            result.seen.append(scan.shown)
            self.say(
                f"warning: {scan.shown}: this scan (sha256 {record['sha256'][:12]}) is in the "
                f"store the model was trained on (split {seen}): its answer is not a fair test"
            )
        row = {
            "path": scan.origin or str(scan.path),
            "subject": scan.subject_id,
            "session": scan.session,
        }
        row["seen_in_training"] = seen or ""
        similarity = record.get("similarity")
        if similarity is not None:  # standard space: how well the scan registered
            row["similarity"] = round(float(similarity), 4)
            if similarity < CHECK_FLOOR:
                result.check.append((scan.shown, float(similarity)))
                self.say(check_line(scan.shown, similarity))
        if self.target["task"] == SEGMENTATION:
            row |= _write_segmentation(
                self.folder, scan, record, answer, self.settings, self.probabilities, self.examples
            )
        else:
            row |= _scan_answer(answer, self.target)
        result.scans.append(row)
        self.outputs.append(answer)
        self.facts.append((scan, record))


def read_run(run_dir: Path) -> dict:
    """A run folder's ``config.json``, checked to hold what prediction needs.

    Raises:
        TrainingError: not a run folder, no model, or a config this version cannot read.
    """
    config_path = run_dir / run_folder.CONFIG
    if not run_dir.is_dir() or not config_path.is_file():
        raise TrainingError(f"{run_dir}: not a run folder (no {run_folder.CONFIG})")
    if not (run_dir / run_folder.MODEL).is_file():
        raise TrainingError(f"{run_dir}: no {run_folder.MODEL}: the run has no model to apply")
    try:
        config = json.loads(config_path.read_text())
        store_config = run_folder.stores_read(config)[0]["config"]
        config["target"]["task"], store_config["size"]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise TrainingError(
            f"{config_path}: not a config this version of slicestore reads ({exc!r})"
        ) from exc
    return config


def preprocess_settings(store_config: dict, labels=None) -> PreprocessSettings:
    """The preprocessing settings a store was made with, for new scans: what a slice is
    (axis, size, normalisation, modalities, context, space, ...), not which scans or splits.

    Raises:
        TrainingError: the store's settings are not ones this version knows.
    """
    names = {f.name for f in dataclasses.fields(PreprocessSettings)}
    values = {k: v for k, v in store_config.items() if k in names and k not in NOT_FROM_STORE}
    values["suffix"] = tuple(values.get("suffix", ("T1w",)))
    if values.get("template") is None:  # native space, or a standard-space store from before
        values.pop("template", None)
        if values.get("space") == "mni":
            values["template"] = OLD_TEMPLATE
    values["labels"] = None if labels is None else os.fspath(labels)
    try:
        return PreprocessSettings(**values)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"the store's preprocessing settings cannot be used: {exc}") from exc


def load_run_model(run_dir: Path, settings: PreprocessSettings, channels: str) -> keras.Model:
    """The run's best model, checked against the slices the settings make, taking float32
    intensities (:func:`training.model.taking_intensities`)."""
    import training.model
    import training.segmentation  # its loss and metric, for load_model

    try:
        model = keras.saving.load_model(run_dir / run_folder.MODEL, compile=False)
    except Exception as exc:
        raise TrainingError(f"{run_dir / run_folder.MODEL}: cannot be loaded ({exc})") from exc
    count = len(schema.channel_names(settings.suffix, settings.context))
    size = settings.size
    expected = (size, size, count) if channels == "last" else (count, size, size)
    if tuple(model.input_shape[1:]) != expected:
        raise TrainingError(
            f"{run_dir / run_folder.MODEL}: its input is {tuple(model.input_shape[1:])}, but "
            f"the store's settings make slices of {expected}"
        )
    return training.model.taking_intensities(model)


def _training_scans(store: dict, report) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 -> split, and subject id -> split, of the scans of the store the run read
    (empty when the store is gone)."""
    path = store.get("path", "")
    try:
        with open_store(path) as opened:
            table = opened.subjects_table()
            splits = table[schema.SUBJECT_SPLIT]
            return (
                dict(zip(table[schema.SHA256], splits, strict=True)),
                dict(zip(table[schema.SUBJECT_ID], splits, strict=True)),
            )
    except (OSError, ValueError):
        report(f"warning: {path}: the run's store cannot be read: scans are not checked for leaks")
        return {}, {}


def _scan_answer(outputs: np.ndarray, target: dict) -> dict:
    """One scan's answer from its slices alone (their outputs averaged)."""
    mean = outputs.reshape(len(outputs), -1).mean(axis=0)
    if target["task"] == REGRESSION:
        return {"predicted": f"{mean[0]:.4g}", "probability": "", "slices": len(outputs)}
    chances = class_probabilities(mean[None, :])[0]
    best = int(np.argmax(chances))
    row = {"predicted": target["class_names"][best], "probability": f"{chances[best]:.4f}"}
    row |= {f"p_{name}": f"{p:.4f}" for name, p in zip(target["class_names"], chances, strict=True)}
    return row | {"slices": len(outputs)}


def _true_values(participants: dict, column: str | None, labels) -> dict:
    """subject id -> the true value of the run's target ``column``, from the labels table
    (``labels``, or the ``participants.tsv`` of BIDS inputs)."""
    rows = participants.items()
    values = {k: row[column] for k, row in rows if column and row.get(column) is not None}
    if labels is not None and not values:
        raise TrainingError(f"{labels}: no values of {column!r} (the run's target)")
    return values


def _per_subject(answers: _Answers, target: dict, splits, truth: dict) -> tuple[list[dict], dict]:
    """One row per subject (slices of all its scans pooled, as evaluation pools them) and,
    with true values, the scores.

    Raises:
        TrainingError: a labels table was given and none of the scans' subjects is in it.
    """
    outputs, facts = answers.outputs, answers.facts
    subjects = {scan.subject_id for scan, _ in facts}
    if answers.settings.labels is not None and not subjects & set(truth):
        raise TrainingError(
            f"{answers.settings.labels}: no subject of the scans has a value in it (ids such "
            f"as {sorted(truth)[:3]} against {sorted(subjects)[:3]})"
        )
    if target["task"] == SEGMENTATION:
        return _segmentation_subjects(outputs, facts), {}
    flat = np.concatenate([o.reshape(len(o), -1) for o in outputs])
    ids = np.concatenate(
        [[scan.subject_id] * len(o) for o, (scan, _) in zip(outputs, facts, strict=True)]
    )
    sessions: dict[str, set] = {}
    for scan, _ in facts:
        sessions.setdefault(scan.subject_id, set()).update([scan.session] if scan.session else [])
    averaged = subject_predictions(flat, ids)
    rows = []
    for subject, mean, count in zip(
        averaged["subject"], averaged["mean"], averaged["slices"], strict=True
    ):
        row = {"subject": subject, "sessions": ";".join(sorted(sessions[subject]))}
        row["split"] = splits.get(subject, "")  # in the store the model was trained on
        row["true"] = "" if subject not in truth else str(truth[subject])
        row |= _scan_answer(mean[None, :], target) | {"slices": int(count)}
        rows.append(row)
    metrics = {}
    present = np.array([subject in truth for subject in ids])
    if present.any():
        if target["task"] == REGRESSION:
            values = np.array([float(truth[s]) for s in ids[present]])
            metrics = evaluate_regression(flat[present], values, ids[present])
        else:
            names = target["class_names"]
            known_class = np.array([str(truth.get(s)) in names for s in ids])
            keep = present & known_class
            values = np.array([names.index(str(truth[s])) for s in ids[keep]])
            metrics = evaluate_outputs(flat[keep], values, ids[keep]) if keep.any() else {}
    return rows, metrics


def _segmentation_subjects(outputs, facts) -> list[dict]:
    """Predicted foreground pixels per subject, over its slices (as ``predictions.csv``)."""
    rows: dict[str, dict] = {}
    for answer, (scan, _) in zip(outputs, facts, strict=True):
        row = rows.setdefault(
            scan.subject_id,
            {"subject": scan.subject_id, "sessions": set(), "predicted_pixels": 0, "slices": 0},
        )
        row["sessions"].update([scan.session] if scan.session else [])
        row["predicted_pixels"] += int((answer.argmax(-1) > 0).sum())
        row["slices"] += len(answer)
    return [row | {"sessions": ";".join(sorted(row["sessions"]))} for row in rows.values()]


def _write_segmentation(
    folder: Path, scan, record, answer, settings, probabilities, examples: list
) -> dict:
    """The most probable label on the scan's own grid (shape and affine of its file)."""
    maps = on_scan_grid(answer.astype(np.float32), record, settings)
    image = nib.load(scan.path)
    ornt = orientations.io_orientation(image.affine)
    back = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")), ornt)
    labels = orientations.apply_orientation(maps.argmax(-1).astype(np.uint8), back)
    name = _output_name(scan)
    _keep_example(examples, scan, image, labels, settings)
    write_on_grid(folder / f"{name}{SEGMENTATION_ENDING}", labels, image.affine)
    row = {"segmentation": f"{name}{SEGMENTATION_ENDING}", "slices": len(answer)}
    counts = np.bincount(labels.ravel(), minlength=answer.shape[-1])
    row |= {f"voxels_{k}": int(n) for k, n in enumerate(counts) if k > 0}
    if probabilities:
        stack = np.stack(
            [orientations.apply_orientation(maps[..., k], back) for k in range(maps.shape[-1])], -1
        )
        maps_image = nib.Nifti1Image(stack.astype(np.float32), image.affine)
        files.write_bytes(folder / f"{name}{PROBABILITIES_ENDING}", _gzipped(maps_image))
    return row


EXAMPLES = 4  # scans drawn in the picture: those with the most predicted voxels


def _keep_example(examples: list, scan, image, labels: np.ndarray, settings) -> None:
    """Keep the plane through the middle of the predicted region (along the file's third
    voxel axis) of the scans with the most predicted voxels, for the picture."""
    found = np.argwhere(labels > 0)
    size = len(found)
    if len(examples) == EXAMPLES and size <= examples[-1][0]:
        return
    k = int(np.median(found[:, 2])) if size else labels.shape[2] // 2
    data = np.asanyarray(image.dataobj)
    if data.ndim > 3:
        data = data.reshape(*data.shape[:3], -1)[..., settings.volume or 0]
    codes = "".join(orientations.aff2axcodes(image.affine))
    title = f"{Path(scan.path).name}\nplane {k} of axis 3 ({codes}); {size} voxels"
    examples.append((size, title, np.asarray(data[:, :, k], np.float32), labels[:, :, k]))
    examples.sort(key=lambda example: -example[0])
    del examples[EXAMPLES:]


def _gzipped(image: nib.Nifti1Image) -> bytes:
    """A NIfTI image as the bytes of a ``.nii.gz`` file."""
    return gzip.compress(image.to_bytes(), compresslevel=6)


def write_on_grid(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """``data`` on the grid ``affine`` as a ``.nii.gz`` file whose qform and sform are both
    that affine (code 1, scanner), written through the one write helper."""
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    files.write_bytes(path, _gzipped(image))


def on_scan_grid(answer: np.ndarray, record: dict, settings: PreprocessSettings) -> np.ndarray:
    """Per-slice maps ``(n, S, S, K)`` of one scan on its canonical grid, ``(x, y, z, K)``:
    back through the slices' resampling and, in standard space, the registration. Outside
    the kept slices every voxel is background (label 0)."""
    outside = np.zeros(answer.shape[-1], np.float32)
    outside[0] = 1
    positions = np.asarray(record["positions"])
    shape, affine = tuple(record["shape"]), np.asarray(record["affine"])
    if settings.space != "mni":
        return unslice(
            answer, positions, shape, np.asarray(record["voxel_size"]), settings.axis, outside
        )
    template = load_template(settings.axis, settings.min_foreground, settings.template)
    planes = template.planes()
    slab = list(template.image.shape)
    slab[AXES[settings.axis]] = planes[1] - planes[0]
    maps = unslice(
        answer, positions - planes[0], tuple(slab), template.voxel_size, settings.axis, outside
    )
    return from_template(
        maps, planes, np.asarray(record["to_template"]), template, affine, shape, outside
    )


def _output_name(scan) -> str:
    """The file name of a scan's outputs: its source path, flattened."""
    source = str(scan.source)
    for suffix in (".nii.gz", ".nii"):
        if source.endswith(suffix):
            source = source[: -len(suffix)]
    return source.replace(os.sep, "__")


def _write_tables(folder: Path, result: Prediction, target: dict) -> None:
    for name, rows in ((run_folder.PREDICTIONS, result.subjects), (SCANS, result.scans)):
        files.write_rows(folder / name, rows)
    if result.metrics:
        document = {"target": target["name"], "task": target["task"], "scores": result.metrics}
        files.write_text(folder / run_folder.METRICS, json.dumps(document, indent=2))
