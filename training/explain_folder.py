"""What ``python -m training explain`` writes into OUT, named once, written subject by subject.

``maps/<subject>.npy`` (and ``.nii.gz`` on the template's grid in standard space),
``pictures/<subject>.png``, ``average/<group>.npy`` over ``average/slices.npy`` (and
``.nii.gz``), ``groups.png``, ``subjects.csv`` and ``explain.json``. Each subject's
outputs are written as it comes; the group averages are running sums, so one subject's
slices are in memory at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from loader import Store, files
from loader.schema import VIEW_SIDES
from loader.target import REGRESSION
from preprocess.slices import unslice
from training.inference import write_on_grid
from training.occlusion import METHOD
from training.plots import plot_maps

MAPS = "maps"  # OUT/maps/<subject>.npy: (n, S, S), one map per stored slice
AVERAGES = "average"  # OUT/average/<group>.npy: (P, S, S) over OUT/average/slices.npy
PICTURES = "pictures"  # OUT/pictures/<subject>.png
GROUPS_PICTURE = "groups.png"
SUBJECTS = "subjects.csv"
SUMMARY = "explain.json"
FOLDERS = (MAPS, PICTURES, AVERAGES)
DRAWN = 8  # slices drawn per subject and per group


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


def _file_stem(name: str) -> str:
    """A subject id or group name as a file name.

    >>> _file_stem("site-a/01"), _file_stem("age 20-35")
    ('site-a__01', 'age_20-35')
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "__"))


class Writer:
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
        files.save_array(self.partial / MAPS / f"{stem}.npy", item["maps"])
        positions, maps, images = _per_position(item, self.channel)  # sessions averaged
        if self.template is not None:
            path = self.partial / MAPS / f"{stem}.nii.gz"
            _save_on_template(path, positions, maps, self.template)
        row = _subject_row(item, self.task, self.class_names, stem)
        self.result.subjects.append(row)
        name = self.group(item)
        self.result.groups.setdefault(name, []).append(subject.name)
        sums = self.sums.setdefault(name, {})
        for position, position_map, image in zip(positions, maps, images, strict=True):
            entry = sums.setdefault(int(position), [0.0, 0.0, 0])
            entry[0] = entry[0] + position_map
            entry[1] = entry[1] + image
            entry[2] += 1
        picture = _subject_picture(item, self.task, self.class_names, self.config, self.sides)
        plot_maps(*picture, self.partial / PICTURES / f"{stem}.png")

    def finish(self, stores, split: str, patch: int) -> None:
        """The averages, their picture, ``subjects.csv`` and ``explain.json``."""
        averages = self.partial / AVERAGES
        positions = np.array(sorted({p for sums in self.sums.values() for p in sums}), np.int64)
        files.save_array(averages / "slices.npy", positions)
        lines = []
        for name, sums in self.sums.items():
            maps, images = _averages(sums, positions)
            files.save_array(averages / f"{_file_stem(name)}.npy", maps)
            if self.template is not None:
                path = averages / f"{_file_stem(name)}.nii.gz"
                _save_on_template(path, positions, np.nan_to_num(maps), self.template)
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


def _per_position(item: dict, channel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A subject's positions, and its map and image (``channel``) at each, its sessions
    averaged (float64)."""
    positions = np.unique(item["positions"])
    at = [item["positions"] == position for position in positions]
    maps = np.stack([item["maps"][mine].mean(axis=0, dtype=np.float64) for mine in at])
    images = np.stack([item["images"][mine][..., channel].mean(axis=0) for mine in at])
    return positions, maps, images


def _save_on_template(path: Path, positions, maps: np.ndarray, template: dict) -> None:
    """Maps of the stored planes ``positions`` on the template's grid (its shape and
    affine), 0 elsewhere."""
    affine = np.asarray(template["affine"], dtype=np.float64)
    volume = unslice(
        maps[..., None].astype(np.float32), positions, tuple(template["shape"]),
        nib.affines.voxel_sizes(affine), template["axis"], np.zeros(1, np.float32),
    )[..., 0]  # fmt: skip
    write_on_grid(path, volume.astype(np.float32), affine)
