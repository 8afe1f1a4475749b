"""Runs side by side: one row per run folder, the settings that differ, scores and curves.

Everything comes from the run folders (``config.json``, ``metrics.json``,
``history.csv``, a checkpoint): a run is ``complete``, ``interrupted`` (stopped by
Ctrl-C or SIGTERM, resumable), or ``unfinished`` (killed, or still running: no
``metrics.json`` yet). Runs that read different stores are allowed and flagged, since
their scores are on different subjects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from loader import files
from loader.target import REGRESSION, SEGMENTATION
from training import run_folder
from training.errors import TrainingError
from training.fitting import MONITORS, best_epoch
from training.plots import plot_compared_curves, read_history
from training.settings import NOT_COMPUTED, saved_settings

TABLE = "compare.csv"
PICTURE = "compare.png"
# The scores shown per task (metrics.json's names), at both levels of each scored split.
SCORES = {
    "classification": ("accuracy", "roc_auc"),
    REGRESSION: ("mae", "r"),
    SEGMENTATION: ("mean_dice",),
}
# Settings not shown as their own column when they differ: those that do not change what a
# run computes, and those the table shows anyway (target, task, splits).
QUIET_SETTINGS = (*NOT_COMPUTED, "target", "task", "train_split", "val_split", "test_split")


@dataclass
class Comparison:
    """What ``compare`` found.

    Attributes:
        rows: one dict per run (the rows of ``compare.csv``).
        differing: the settings whose values differ between the runs.
        notes: lines about the comparison (runs on different stores).
        table: the ``compare.csv`` written; picture: ``compare.png``.
    """

    rows: list[dict] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: Path | None = None
    picture: Path | None = None


def run_folders(paths: list[str | os.PathLike]) -> list[Path]:
    """The run folders named: each path is one (it holds ``config.json``) or holds some
    (its sub-folders that do, in name order).

    Raises:
        TrainingError: a path that is neither, or the same run twice.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / run_folder.CONFIG).is_file():
            found.append(path)
            continue
        inside = (
            sorted(p for p in path.iterdir() if (p / run_folder.CONFIG).is_file())
            if path.is_dir()
            else []
        )
        if not inside:
            raise TrainingError(
                f"{path}: not a run folder (no {run_folder.CONFIG}) nor a folder of run folders"
            )
        found += inside
    resolved = [p.resolve() for p in found]
    if len(set(resolved)) != len(resolved):
        raise TrainingError("a run is named twice: compare each run once")
    return found


def compare(
    paths: list[str | os.PathLike], output: str | os.PathLike = ".", overwrite: bool = False
) -> Comparison:
    """Compare runs; write ``compare.csv`` and ``compare.png`` into ``output``.

    Args:
        paths: run folders, or folders of them.
        output: the folder for ``compare.csv`` and ``compare.png``. Defaults to the
            current folder.
        overwrite: replace those two files when they exist.

    Raises:
        TrainingError: a path that is not a run, an unreadable ``config.json``.
        FileExistsError: ``compare.csv`` or ``compare.png`` exists and not ``overwrite``.
    """
    output = Path(output)
    result = Comparison(table=output / TABLE, picture=output / PICTURE)
    for path in (result.table, result.picture):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: exists; use --overwrite to replace it")
    runs = [_read(path) for path in run_folders(paths)]
    names = _short_names([run["path"] for run in runs])
    result.differing = _differing([saved_settings(run["config"]) for run in runs])
    stores = list(dict.fromkeys(run["store_uuid"] for run in runs))
    for name, run in zip(names, runs, strict=True):
        result.rows.append(_row(name, run, result.differing, stores))
    if len(stores) > 1:
        result.notes.append(
            f"note: the runs read {len(stores)} different stores (column store): their "
            "scores are on different subjects"
        )
        for letter, uuid in zip(_letters(len(stores)), stores, strict=True):
            paths_read = sorted({r["store_path"] for r in runs if r["store_uuid"] == uuid})
            result.notes.append(f"  {letter}: {uuid} ({', '.join(paths_read)})")
    output.mkdir(parents=True, exist_ok=True)
    files.write_rows(result.table, result.rows)
    curves = [(name, run["history"], run["task"]) for name, run in zip(names, runs, strict=True)]
    plot_compared_curves(curves, result.picture)
    return result


def _read(path: Path) -> dict:
    """A run folder's facts: config, metrics (empty when unfinished), history, status."""
    try:
        config = json.loads((path / run_folder.CONFIG).read_text())
        stores = run_folder.stores_read(config)
        target, label_column = config["target"], stores[0].get("config", {}).get("label_column")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise TrainingError(f"{path / run_folder.CONFIG}: unreadable ({exc!r})") from exc
    metrics = {}
    if (path / run_folder.METRICS).is_file():
        try:
            metrics = json.loads((path / run_folder.METRICS).read_text())
        except (OSError, ValueError) as exc:
            raise TrainingError(f"{path / run_folder.METRICS}: unreadable ({exc})") from exc
    if not metrics:
        status = "unfinished"  # killed, or running now
    elif metrics.get("interrupted"):
        status = "interrupted"
    else:
        status = "complete"
    return {
        "path": path,
        "config": config,
        "metrics": metrics,
        "history": read_history(path / run_folder.HISTORY),
        "status": status,
        "task": target.get("task"),
        "target": target.get("name") or label_column or "",
        "store_uuid": "+".join(str(s.get("uuid")) for s in stores),
        "store_path": ";".join(str(s.get("path")) for s in stores),
    }


def _short_names(paths: list[Path]) -> list[str]:
    """Each run's name: its folder's name, or its path below the folder all runs share
    where two folders have the same name.

    >>> _short_names([Path("/r/a/x"), Path("/r/b/x")]), _short_names([Path("/r/a"), Path("/s/b")])
    (['a/x', 'b/x'], ['a', 'b'])
    """
    absolute = [p.resolve() for p in paths]
    names = [p.name for p in absolute]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath(absolute))
    return [str(p.relative_to(common)) for p in absolute]


def _letters(count: int) -> list[str]:
    """
    >>> _letters(3)
    ['A', 'B', 'C']
    """
    return [chr(ord("A") + k) if k < 26 else f"S{k}" for k in range(count)]


def _differing(settings: list[dict]) -> list[str]:
    """The settings whose values are not the same in every run (in declaration order).

    >>> _differing([{"seed": 0, "epochs": 5}, {"seed": 1, "epochs": 5}])
    ['seed']
    """
    names = list(dict.fromkeys(name for s in settings for name in s))
    missing = object()
    return [
        name
        for name in names
        if name not in QUIET_SETTINGS
        and len({json.dumps(s.get(name, missing), default=str) for s in settings}) > 1
    ]


def _row(name: str, run: dict, differing: list[str], stores: list[str]) -> dict:
    config, metrics = run["config"], run["metrics"]
    settings = saved_settings(config)
    store = run["store_uuid"]
    row = {
        "run": name,
        "status": run["status"],
        "store": _letters(len(stores))[stores.index(store)] if len(stores) > 1 else "",
        "store_uuid": store,
        "store_path": run["store_path"],
        "target": run["target"],
        "task": run["task"],
        "train": "+".join(settings.get("train_split") or []),
        "val": settings.get("val_split", ""),
        "test": settings.get("test_split") or "",
    }
    for setting in differing:
        value = settings.get(setting)
        row[setting] = "+".join(map(str, value)) if isinstance(value, list) else _text(value)
    row["epochs_run"] = metrics.get("epochs_run", len(run["history"].get("loss", [])))
    monitor = MONITORS.get(run["task"])
    best = best_epoch(run["history"], monitor) if monitor else None  # so far, when unfinished
    row["best_epoch"] = metrics.get("best_epoch", "" if best is None else best)
    splits = metrics.get("splits", {})
    for role in ("val", "test"):
        for level in ("slices", "subjects"):
            for score in dict.fromkeys(s for scores in SCORES.values() for s in scores):
                value = splits.get(row[role], {}).get(level, {}).get(score)
                row[f"{role}_{level}_{score}"] = "" if value is None else round(float(value), 4)
    row["seconds"] = metrics.get("seconds", "")
    return row


def _text(value) -> str:
    """
    >>> _text(None), _text(0.001), _text(True)
    ('', '0.001', 'True')
    """
    return "" if value is None else str(value)


def format_table(result: Comparison) -> str:
    """The comparison as aligned text: every column with a value in some row."""
    columns = [
        key
        for key in dict.fromkeys(k for row in result.rows for k in row)
        if key not in ("store_uuid", "store_path")
        and any(row.get(key) not in ("", None) for row in result.rows)
    ]
    cells = [[str(column) for column in columns]]
    cells += [[str(row.get(column, "")) for column in columns] for row in result.rows]
    widths = [max(len(line[k]) for line in cells) for k in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )
