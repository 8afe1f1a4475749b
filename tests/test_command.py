"""Settings declared once: the API's checks, the CLIs' options, the README tables, exit codes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import write_id_store

import training
from loader.cli import _parser as loader_parser
from loader.options import SettingError, option_table
from preprocess.cli import _parser as preprocess_parser
from preprocess.settings import RunOptions, Settings
from preprocess.writer import partial_path
from training.cli import _compare_parser, _explain_parser
from training.cli import _parser as training_parser
from training.cli import _predict_parser as predict_parser
from training.cli import main as training_main

ROOT = Path(__file__).resolve().parents[1]
GUIDES = "\n".join(
    (ROOT / name / "README.md").read_text() for name in ("preprocess", "loader", "training")
)


@pytest.mark.parametrize(
    "parser",
    [
        preprocess_parser,
        training_parser,
        loader_parser,
        predict_parser,
        lambda: (_explain_parser(), {}),
        lambda: (_compare_parser(), {}),
    ],
)
def test_the_readme_option_tables_are_the_help(parser):
    table = option_table(parser()[0])
    assert table in GUIDES, f"the guide's table differs from --help; it should be:\n{table}"


@pytest.mark.parametrize(
    ("parser", "classes", "required"),
    [
        (preprocess_parser, (Settings, RunOptions), ["IN", "-o", "s.h5"]),
        (training_parser, (training.Settings,), ["s.h5", "-o", "run"]),
    ],
)
def test_every_setting_is_an_option_with_the_same_default(parser, classes, required):
    built, flags = parser()
    args = built.parse_args(required)
    helps = {action.dest: action.help for action in built._actions}
    for cls in classes:
        defaults = cls()
        for field in fields(cls):
            assert field.name in flags
            assert not hasattr(args, field.name)  # not given: the dataclass default applies
            default = getattr(defaults, field.name)
            if isinstance(default, bool):
                continue
            text = field.metadata["default_text"] or (
                f"{default:g}"
                if isinstance(default, float)
                else " ".join(default)
                if isinstance(default, tuple)
                else "none"
                if default is None
                else str(default)
            )
            assert helps[field.name].endswith(f"(default: {text})")


def test_the_api_names_arguments_and_the_cli_names_flags(tmp_path, capsys):
    store = write_id_store(tmp_path / "s.h5", scans=4)
    message = r"^`batch_size` must be at least 1; received batch_size=0$"
    with pytest.raises(SettingError, match=message):
        training.train(store, tmp_path / "run", batch_size=0)
    assert training_main([str(store), "-o", str(tmp_path / "run"), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == (
        "error: --batch-size must be at least 1; received --batch-size 0\n"
    )
    with pytest.raises(TypeError, match=r"`size` must be int; received size='64'"):
        Settings(size="64")
    with pytest.raises(SettingError, match=r"`val_split` must not be one of `train_split`"):
        training.Settings(train_split=("fold0", "fold1"), val_split="fold1")
    assert not (tmp_path / "run").exists()


def test_validation_inside_the_training_data_is_refused_by_the_cli(tmp_path, capsys):
    store = write_id_store(tmp_path / "s.h5", scans=4)
    args = [str(store), "-o", str(tmp_path / "run"), "--train-split", "train", "val"]
    assert training_main(args) == 2
    assert capsys.readouterr().err.startswith(
        "error: --val-split must not be one of --train-split: it would score the model on "
        "slices it was trained on; received --train-split train val, --val-split val"
    )


def _wait_for(predicate, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ctrl_c_ends_a_training_run_with_reader_processes_quickly(small_phantom_store, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "training", str(small_phantom_store), "-o", str(run_dir)]
    command += ["--epochs", "200", "--patience", "200", "--batch-size", "16"]
    command += ["--workers", "2", "--multiprocessing"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for(
        lambda: (
            len((run_dir / "history.csv").read_text().splitlines()) >= 2
            if (run_dir / "history.csv").exists()
            else False
        ),
        process,
    )
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the run did not end within 60 s of Ctrl-C")
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert "UnpicklingError" not in err, err
    assert "interrupted after" in err, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] is True, (metrics, err)
    assert (run_dir / "model.keras").is_file(), err


# A command whose SIGTERM lands inside a weak reference's callback, where Python drops the
# exception it raises ("Exception ignored in ..."); the command then waits 2 s and says 0.
DROPPED = """
import argparse, os, signal, time, weakref
from loader.exits import run_main

class Thing:
    pass

def body(args):
    thing = Thing()
    ref = weakref.ref(thing, lambda ref: (os.kill(os.getpid(), signal.SIGTERM), sum(range(9))))
    del thing  # the callback runs here, and the signal's handler inside it
    for _ in range(200):
        time.sleep(0.01)
    return 0

raise SystemExit(run_main(argparse.ArgumentParser(), [], body))
"""


def test_a_sigterm_dropped_in_a_garbage_collectors_callback_still_stops_the_command():
    result = subprocess.run(
        [sys.executable, "-c", DROPPED], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == "interrupted\n"


def test_sigterm_stops_preprocess_with_the_whole_command_to_resume(slow_bids, tmp_path):
    bids = slow_bids
    target = tmp_path / "s.h5"
    args = [str(bids), "-o", str(target), "--label-column", "group", "--workers", "1"]
    args += ["--size", "32"]
    process = subprocess.Popen(
        [sys.executable, "-m", "preprocess", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: len(list(partial_path(target).glob("*.json"))) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert not target.exists()
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted; finished scans are kept in {partial_path(target)}")
    resume = shlex.split(line.split("continue with: ", 1)[1])
    assert resume[:3] == ["python", "-m", "preprocess"]
    assert resume[3:] == [*args, "--resume"]
    finished = subprocess.run(
        [sys.executable, *resume[1:]], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert "from an earlier run" in finished.stdout
    assert target.is_file()


def test_ctrl_c_while_tensorflow_loads_is_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "training", str(tmp_path / "s.h5"), "-o", str(tmp_path / "r")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # loading TensorFlow takes seconds
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err == "interrupted before training started\n"
