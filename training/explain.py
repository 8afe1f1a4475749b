"""What a run's model looked at: occlusion maps per slice, per subject and per group.

The method is occlusion (Zeiler & Fergus 2014; compared with gradient maps on MRI
classifiers by Rieke et al. 2018, where it was among the most focused): a square patch of
a slice, every channel, is set to the slice's mean value, position by position, half a
patch apart; each pixel gets the mean fall of the explained
score over the patches that hid it. The score is the probability of the subject's class
(its true class, the predicted one when the subject has no value) or, for regression,
the predicted value in the target's units. Positive pixels held evidence for the answer.

Chosen over Grad-CAM and gradients x input because it asks the model for predictions
only: any ``model_fn`` (no named last convolution needed), either backend (no gradient
code per backend), the augmentation and rescaling layers of a run's model included, and
the map is in the score's own units. The mean, not the darkest value (the background):
a dark square is itself a shape a CNN answers to; on a test store whose answer lies in one
bright square, dark patches put 98 % of the map outside it, mean patches 83-87 % inside.
It costs one prediction per patch position (225 a
slice for 64 x 64 with the default 8-pixel patch), which is why ``--subjects`` exists.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from loader import Store, files, open_store
from loader.schema import SESSION, SUBJECT_ID, VIEW_SIDES
from loader.target import REGRESSION, SEGMENTATION
from preprocess.slices import unslice
from training.data import choose_target
from training.errors import TrainingError
from training.inference import load_run_model, preprocess_settings, read_run
from training.metrics import class_probabilities
from training.plots import plot_maps
from training.settings import Settings

METHOD = "occlusion"
MAPS = "maps"  # OUT/maps/<subject>.npy: (n, S, S), one map per stored slice
AVERAGES = "average"  # OUT/average/<group>.npy: (P, S, S) over OUT/average/slices.npy
PICTURES = "pictures"  # OUT/pictures/<subject>.png
GROUPS_PICTURE = "groups.png"
SUBJECTS = "subjects.csv"
SUMMARY = "explain.json"
QUANTILES = 3  # regression: subjects grouped by thirds of their true value
DRAWN = 8  # slices drawn per subject and per group


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


@dataclass
class Explanation:
    """What ``explain`` did.

    Attributes:
        output: the folder written.
        subjects: one dict per subject explained (the rows of ``subjects.csv``).
        groups: group name -> the subjects in it.
        approximate: the store is in native space: a slice position is not the same
            anatomy for every subject, so the group averages are approximate.
    """

    output: Path
    subjects: list[dict] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    approximate: bool = True
    seconds: float = 0.0


@dataclass
class _Subject:
    """A subject of the split: its store, scans, name and true value (None when absent)."""

    name: str
    store: int
    scans: list[int]
    value: float | int | None
    sessions: list[str]


def explain(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    split: str = "val",
    subjects: list[str] | None = None,
    patch: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Explanation:
    """Occlusion maps of a run's best model on the slices of a split's subjects.

    Args:
        run_dir: a run folder of ``python -m training`` (classification or regression).
        output: the folder to write: ``maps/<subject>.npy`` (and ``.nii.gz`` on the
            template's grid for ``--space mni`` stores), ``average/<group>.npy``,
            ``pictures/<subject>.png``, ``groups.png``, ``subjects.csv``, ``explain.json``.
        split: the store's split whose subjects are explained. Defaults to ``val``.
        subjects: subject ids (with or without ``sub-``). Defaults to every subject of
            the split.
        patch: the side of the hidden square in pixels. Defaults to an eighth of a slice.
        overwrite: replace an existing ``output``.
        progress: a progress bar over subjects; None shows one on a terminal.

    Raises:
        TrainingError: not a run folder, no model, a segmentation run, a store that is
            gone or was rewritten, a split the store lacks, an unknown subject.
        FileExistsError: ``output`` exists and not ``overwrite``.
    """
    started = time.perf_counter()
    run_dir, output = Path(run_dir), Path(output)
    config = read_run(run_dir)
    task = config["target"]["task"]
    if task == SEGMENTATION:
        raise TrainingError(
            f"{run_dir}: a segmentation run: its output is already a map per pixel; explain "
            "answers classification and regression runs"
        )
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; use --overwrite to replace it")
    facts = config["store"] if isinstance(config["store"], list) else [config["store"]]
    settings = _run_settings(config)
    with _RunStores(facts) as stores:
        size = stores[0].slice_shape[0]
        patch = max(2, size // 8) if patch is None else patch
        if not 1 <= patch <= size:
            raise TrainingError(f"--patch must be 1 to {size} pixels; received {patch}")
        model = load_run_model(run_dir, preprocess_settings(facts[0]["config"]), settings.channels)
        targets = choose_target(stores, settings)
        chosen = _chosen(stores, targets, split, subjects)
        score = _scorer(model, task, settings.channels)
        result = Explanation(output, approximate=stores[0].space != "mni")
        rows = _rows_of(stores, chosen)
        partial = files.fresh_folder(output)
        try:
            for folder in (MAPS, PICTURES, AVERAGES):
                (partial / folder).mkdir()
            writer = _Writer(partial, result, stores[0], config, _grouping(chosen, task, config))
            show = sys.stderr.isatty() if progress is None else progress
            for subject in tqdm(chosen, unit="subject", disable=not show, file=sys.stderr):
                item = _explain_subject(subject, stores, rows, score, task, patch)
                writer.add(item)  # written now: one subject's slices in memory at a time
            writer.finish(stores, split, patch)
            files.publish_folder(partial, output)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    result.seconds = time.perf_counter() - started
    return result


def _run_settings(config: dict) -> Settings:
    """The run's settings, as far as this version knows them."""
    known = set(Settings.__dataclass_fields__)
    values = {k: v for k, v in config.get("settings", {}).items() if k in known}
    try:
        return Settings(**values)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"the run's settings cannot be read: {exc}") from exc


class _RunStores:
    """The run's stores, opened and checked to be the files the run read."""

    def __init__(self, facts: list[dict]):
        self.facts, self.opened = facts, []

    def __enter__(self) -> list[Store]:
        try:
            for fact in self.facts:
                store = open_store(fact["path"])
                self.opened.append(store)
                if store.uuid != fact["uuid"]:
                    raise TrainingError(
                        f"{fact['path']}: not the store the run read (store {store.uuid}, "
                        f"the run read {fact['uuid']}): it was written again"
                    )
        except (OSError, ValueError) as exc:
            self.__exit__()
            if isinstance(exc, TrainingError):
                raise
            raise TrainingError(f"the run's store cannot be read: {exc}") from exc
        return self.opened

    def __exit__(self, *exc_info) -> None:
        for store in self.opened:
            store.close()


def _chosen(stores, targets, split: str, wanted: list[str] | None) -> list[_Subject]:
    """The subjects of ``split`` (those named in ``wanted``), with their scans and values."""
    found: dict[str, _Subject] = {}
    elsewhere: dict[str, str] = {}
    for index, (store, target) in enumerate(zip(stores, targets, strict=True)):
        try:
            store.select(split)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        table = store.subjects_table()
        inside = store.scans_in([split])
        prefix = f"{Path(store.path).stem}/" if len(stores) > 1 else ""
        for scan, subject_id in enumerate(table[SUBJECT_ID]):
            name = prefix + str(subject_id)
            if not inside[scan]:
                elsewhere.setdefault(name, "another split")
                continue
            value = target.values[scan].item() if target.present[scan] else None
            subject = found.setdefault(name, _Subject(name, index, [], value, []))
            subject.scans.append(scan)
            if table[SESSION][scan]:
                subject.sessions.append(str(table[SESSION][scan]))
    if wanted is None:
        if not found:
            raise TrainingError(f"split {split!r} has no subjects")
        return [found[name] for name in sorted(found)]
    chosen = []
    for name in wanted:
        bare = name.removeprefix("sub-")
        if bare not in found:
            where = f"it is in {elsewhere[bare]}" if bare in elsewhere else "no such subject"
            raise TrainingError(
                f"subject {name!r} is not in split {split!r} ({where}); the split has "
                f"{', '.join(sorted(found)[:5])}{' ...' if len(found) > 5 else ''}"
            )
        chosen.append(found[bare])
    return chosen


def _scorer(model, task: str, channels: str):
    """``score(x)``: the model's class probabilities ``(m, K)``, or its value ``(m, 1)``."""

    def score(x: np.ndarray) -> np.ndarray:
        if channels == "first":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        outputs = np.asarray(model.predict_on_batch(x), np.float64)
        if task == REGRESSION:
            return outputs.reshape(len(outputs), -1)
        return class_probabilities(outputs)

    return score


READ_BLOCK = 1 << 20  # rows of /subject read at a time while finding the subjects' rows


def _rows_of(stores, chosen: list[_Subject]) -> dict[tuple[int, int], np.ndarray]:
    """(store, scan) -> the scan's rows, in one pass over each store's ``/subject``
    (rows are shuffled within a split: a scan's rows are spread over it)."""
    found: dict[tuple[int, int], list[np.ndarray]] = {}
    for index, store in enumerate(stores):
        wanted = np.array([scan for s in chosen if s.store == index for scan in s.scans])
        if not len(wanted):
            continue
        for start in range(0, store.num_slices, READ_BLOCK):
            block = np.asarray(store.subject[start : start + READ_BLOCK])
            hits = np.flatnonzero(np.isin(block, wanted))
            for scan in np.unique(block[hits]):
                rows = start + hits[block[hits] == scan]
                found.setdefault((index, int(scan)), []).append(rows)
    return {key: np.concatenate(parts) for key, parts in found.items()}


def _subject_slices(store: Store, rows_per_scan: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """A subject's stored slices as float32 ``(n, S, S, C)`` and their ``/slice``
    positions, in increasing position (at equal positions, its scans in the subjects
    table's order: sessions)."""
    rows = np.concatenate(rows_per_scan).astype(np.int64)
    scan_rank = np.concatenate([np.full(len(r), k) for k, r in enumerate(rows_per_scan)])
    by_row = np.argsort(rows)
    stored = store.images[rows[by_row]]  # only these rows (h5py reads a sorted list of rows)
    stored = stored if stored.ndim == 4 else stored[..., None]
    images = stored.astype(np.float32) * np.float32(store.scale) + np.float32(store.offset)
    positions = np.asarray(store.slice_index[rows[by_row]], dtype=np.int64)
    order = np.lexsort((scan_rank[by_row], positions))  # by position, then by scan
    return images[order], positions[order]


def _explain_subject(subject: _Subject, stores, rows, score, task: str, patch: int) -> dict:
    """One subject's maps, slices and answer."""
    store = stores[subject.store]
    mine = [rows.get((subject.store, scan), np.zeros(0, np.int64)) for scan in subject.scans]
    images, positions = _subject_slices(store, mine)
    outputs = score(images).mean(axis=0)  # pooled over slices, as evaluation pools
    if task == REGRESSION:
        column, predicted = 0, float(outputs[0])
    else:
        predicted = int(np.argmax(outputs))
        column = predicted if subject.value is None else int(subject.value)
    columns = np.full(len(images), column)
    maps = occlusion_maps(score, images, columns, patch)
    return {
        "subject": subject,
        "images": images,
        "positions": positions,
        "maps": maps,
        "column": column,
        "predicted": predicted,
        "probability": None if task == REGRESSION else float(outputs[predicted]),
    }


def _file_stem(name: str) -> str:
    """A subject id or group name as a file name.

    >>> _file_stem("site-a/01"), _file_stem("age 20-35")
    ('site-a__01', 'age_20-35')
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "__"))


def _grouping(chosen: list[_Subject], task: str, config: dict):
    """``group(item) -> name``: the class explained, or for regression the third of the
    true values the subject's value (the predicted one where none) falls in."""
    target = config["target"]
    if task != REGRESSION:
        names = target["class_names"]
        return lambda item: names[item["column"]]
    label = target["name"] or "value"
    values = np.array([s.value for s in chosen if s.value is not None], dtype=np.float64)
    if len(values) < QUANTILES:
        return lambda item: f"{label} (all)"
    edges = np.quantile(values, np.linspace(0, 1, QUANTILES + 1))

    def third(item) -> str:
        value = item["predicted"] if item["subject"].value is None else item["subject"].value
        k = int(np.clip(np.searchsorted(edges, value, side="right") - 1, 0, QUANTILES - 1))
        return f"{label} {edges[k]:.3g}-{edges[k + 1]:.3g}"

    return third


class _Writer:
    """Writes each subject's outputs as it comes and keeps, per group, running sums of the
    maps and images at each slice position (a subject's sessions averaged first)."""

    def __init__(self, partial: Path, result: Explanation, store: Store, config: dict, group):
        self.partial, self.result, self.config, self.group = partial, result, config, group
        self.task = config["target"]["task"]
        self.class_names = config["target"]["class_names"] or []
        self.channel = int(store.config.get("context", 0))  # the slice itself
        self.sides = VIEW_SIDES.get(store.config.get("axis", ""))
        self.template = store.template if store.space == "mni" else None
        self.sums: dict[str, dict[int, list]] = {}  # group -> position -> [map, image, count]

    def add(self, item: dict) -> None:
        item["channel"] = self.channel
        subject = item["subject"]
        stem = _file_stem(subject.name)
        np.save(self.partial / MAPS / f"{stem}.npy", item["maps"])
        if self.template is not None:
            _save_on_template(self.partial / MAPS / f"{stem}.nii.gz", item, self.template)
        row = _subject_row(item, self.task, self.class_names, stem)
        self.result.subjects.append(row)
        name = self.group(item)
        self.result.groups.setdefault(name, []).append(subject.name)
        sums = self.sums.setdefault(name, {})
        for position in np.unique(item["positions"]):
            mine = item["positions"] == position
            entry = sums.setdefault(int(position), [0.0, 0.0, 0])
            entry[0] = entry[0] + item["maps"][mine].mean(axis=0, dtype=np.float64)
            entry[1] = entry[1] + item["images"][mine][..., self.channel].mean(axis=0)
            entry[2] += 1
        picture = _subject_picture(item, self.task, self.class_names, self.config, self.sides)
        plot_maps(*picture, self.partial / PICTURES / f"{stem}.png")

    def finish(self, stores, split: str, patch: int) -> None:
        """The averages, their picture, ``subjects.csv`` and ``explain.json``."""
        averages = self.partial / AVERAGES
        positions = np.array(sorted({p for sums in self.sums.values() for p in sums}), np.int64)
        np.save(averages / "slices.npy", positions)
        lines = []
        for name, sums in self.sums.items():
            maps, images = _averages(sums, positions)
            np.save(averages / f"{_file_stem(name)}.npy", maps)
            if self.template is not None:
                average = {"maps": np.nan_to_num(maps), "positions": positions}
                _save_on_template(averages / f"{_file_stem(name)}.nii.gz", average, self.template)
            count = len(self.result.groups[name])
            lines.append(_group_line(name, count, maps, images, positions))
        note = (
            "native space: slice k is not the same anatomy in every subject, the averages "
            "are approximate"
            if self.result.approximate
            else f"standard space ({self.template['name']}): slice k is the same anatomy for all"
        )
        title = f"{METHOD} ({patch}-pixel patches), averaged per group over {split}; {note}"
        plot_maps(lines, title, self.sides, self.partial / GROUPS_PICTURE)
        files.write_rows(self.partial / SUBJECTS, self.result.subjects)
        summary = {
            "method": METHOD,
            "score": (
                "the predicted value" if self.task == REGRESSION else "the probability of the class"
            ),
            "patch": patch,
            "stride": max(1, patch // 2),
            "fill": "the slice's mean value per channel",
            "split": split,
            "space": stores[0].space,
            "approximate": self.result.approximate,
            "target": self.config["target"]["name"],
            "task": self.task,
            "stores": [{"path": s.path, "uuid": s.uuid} for s in stores],
            "groups": self.result.groups,
        }
        files.write_text(self.partial / SUMMARY, json.dumps(summary, indent=2))


def _averages(sums: dict[int, list], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A group's map and image averaged over its subjects at each position; NaN where no
    subject of the group has the position."""
    size = next(iter(sums.values()))[0].shape
    maps = np.full((len(positions), *size), np.nan, np.float32)
    images = np.full((len(positions), *size), np.nan, np.float32)
    for k, position in enumerate(positions):
        if int(position) in sums:
            total_map, total_image, count = sums[int(position)]
            maps[k], images[k] = total_map / count, total_image / count
    return maps, images


def _subject_row(item: dict, task: str, class_names: list[str], stem: str) -> dict:
    subject = item["subject"]
    row = {"subject": subject.name, "sessions": ";".join(sorted(set(subject.sessions)))}
    if task == REGRESSION:
        true = "" if subject.value is None else f"{subject.value:g}"
        row |= {"true": true, "predicted": f"{item['predicted']:.4g}", "explained": "value"}
    else:
        true = "" if subject.value is None else class_names[int(subject.value)]
        row |= {
            "true": true,
            "predicted": class_names[item["predicted"]],
            "probability": f"{item['probability']:.4f}",
            "explained": class_names[item["column"]],
        }
    positions = item["positions"]
    row |= {"slices": len(positions), "first_slice": int(positions[0])}
    return row | {"last_slice": int(positions[-1]), "map": f"{MAPS}/{stem}.npy"}


def _spread(count: int, wanted: int = DRAWN) -> np.ndarray:
    """Up to ``wanted`` indices spread evenly over ``count``.

    >>> _spread(3).tolist(), _spread(100, 4).tolist()
    ([0, 1, 2], [0, 33, 66, 99])
    """
    return np.unique(np.linspace(0, count - 1, min(count, wanted)).round().astype(int))


def _subject_picture(item, task, class_names, config, sides) -> tuple:
    subject = item["subject"]
    target_name = config["target"]["name"] or "value"
    tiles = [
        (
            f"slice {item['positions'][k]}",
            item["images"][k, ..., item["channel"]],
            item["maps"][k],
        )
        for k in _spread(len(item["maps"]))
    ]
    if task == REGRESSION:
        what = f"{target_name}: true {subject.value}, predicted {item['predicted']:.3g}"
        score = "the predicted value"
    else:
        true = "?" if subject.value is None else class_names[int(subject.value)]
        what = f"true {true}, predicted {class_names[item['predicted']]}"
        score = f"p({class_names[item['column']]})"
    title = f"sub-{subject.name}: {what}; red: hiding it lowers {score}"
    return [(f"sub-{subject.name}", tiles)], title, sides


def _group_line(name, count, maps, images, positions) -> tuple[str, list]:
    """One row of the groups picture: the group's average at evenly spread positions."""
    present = np.flatnonzero(~np.isnan(maps).any(axis=(1, 2)))
    tiles = [(f"slice {positions[k]}", images[k], maps[k]) for k in present[_spread(len(present))]]
    return f"{name}\n({count} subjects)", tiles


def _save_on_template(path: Path, item: dict, template: dict) -> None:
    """Maps on the template's grid (its shape and affine), one value per voxel of the
    stored planes (a subject's sessions averaged), 0 elsewhere."""
    positions = np.unique(item["positions"])
    maps = np.stack([item["maps"][item["positions"] == p].mean(axis=0) for p in positions])
    affine = np.asarray(template["affine"], dtype=np.float64)
    voxel_size = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    volume = unslice(
        maps[..., None], positions, tuple(template["shape"]), voxel_size, template["axis"],
        np.zeros(1, np.float32),
    )[..., 0]  # fmt: skip
    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    files.write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=6))
