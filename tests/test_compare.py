"""Runs side by side: the right rows, the settings that differ, stores and states flagged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import read_rows
from run_helpers import StopAt

from training import train
from training.cli import main as training_main
from training.compare import compare


@pytest.fixture(scope="module")
def runs(small_phantom_store, tmp_path_factory) -> Path:
    """A folder of three runs on one store: the groups, age (another target and learning
    rate), and the groups again with another seed, interrupted in its second epoch."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(epochs=2, batch_size=64, progress=False)
    train(small_phantom_store, root / "group", **common)
    train(small_phantom_store, root / "age", target="age", learning_rate=0.01, **common)
    stopped = train(
        small_phantom_store, root / "stopped", seed=5, callbacks=[StopAt(1, 0)], **common
    )
    assert stopped.interrupted
    return root


def test_compare_lists_each_run_with_its_scores_and_the_settings_that_differ(
    runs, tmp_path, capsys
):
    out = tmp_path / "out"
    assert training_main(["compare", str(runs), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = printed[0].split()
    assert header[:3] == ["run", "status", "target"]
    assert {"learning_rate", "seed"} <= set(header)  # differ between the runs
    assert "epochs" not in header  # the same in all three
    assert "batch_size" not in header
    rows = {row["run"]: row for row in read_rows(out / "compare.csv")}
    assert sorted(rows) == ["age", "group", "stopped"]
    assert [rows[name]["status"] for name in ("age", "group", "stopped")] == [
        "complete",
        "complete",
        "interrupted",
    ]
    assert (rows["group"]["target"], rows["age"]["target"]) == ("group", "age")
    assert (rows["group"]["task"], rows["age"]["task"]) == ("classification", "regression")
    assert (rows["age"]["learning_rate"], rows["stopped"]["seed"]) == ("0.01", "5")
    for name, score in (("group", "accuracy"), ("age", "mae")):
        metrics = json.loads((runs / name / "metrics.json").read_text())["splits"]
        for role, split in (("val", "val"), ("test", "test")):
            for level in ("slices", "subjects"):
                expected = metrics[split][level][score]
                found = float(rows[name][f"{role}_{level}_{score}"])
                assert found == pytest.approx(expected, abs=1e-4)
    assert rows["stopped"]["val_subjects_accuracy"] == ""  # interrupted before scoring
    assert rows["stopped"]["epochs_run"] == "1"
    assert len({row["store_uuid"] for row in rows.values()}) == 1
    assert not any(row["store"] for row in rows.values())  # one store: nothing to flag
    assert (out / "compare.png").is_file()
    lines = {line.split()[0]: line for line in printed[1:4]}
    assert "interrupted" in lines["stopped"]


def test_runs_on_other_stores_and_unfinished_runs_are_flagged(runs, tmp_path):
    other = tmp_path / "other-store"
    shutil.copytree(runs / "group", other)
    config = json.loads((other / "config.json").read_text())
    config["store"]["uuid"] = "00000000-another-store"
    (other / "config.json").write_text(json.dumps(config))
    killed = tmp_path / "killed"
    shutil.copytree(runs / "group", killed)
    (killed / "metrics.json").unlink()  # killed before it scored: no metrics.json
    result = compare([runs / "group", other, killed], tmp_path / "out")
    rows = {row["run"]: row for row in result.rows}
    assert rows["killed"]["status"] == "unfinished"
    assert rows["killed"]["best_epoch"] in (1, 2)  # from history.csv
    assert [rows[name]["store"] for name in ("group", "other-store", "killed")] == ["A", "B", "A"]
    assert any("2 different stores" in line for line in result.notes)


def test_what_cannot_be_compared_is_one_line(runs, tmp_path, capsys):
    assert training_main(["compare", str(tmp_path), "-o", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "compare.csv").write_text("mine\n")
    assert training_main(["compare", str(runs / "group"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "compare.csv: exists" in err
    assert len(err.splitlines()) == 1
    assert (tmp_path / "compare.csv").read_text() == "mine\n"
    assert training_main(["compare", str(runs / "group"), str(runs / "group")]) == 2
    assert "named twice" in capsys.readouterr().err
