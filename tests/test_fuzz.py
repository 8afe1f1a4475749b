"""Hostile and damaged NIfTI files: never a traceback, a hang or unbounded memory."""

from __future__ import annotations

import gzip
import shutil
import struct
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fuzz_preprocess import FIELDS, fuzz, mutate, sources
from helpers import NIBABEL_DATA, blob_volume, write_nifti

from loader.store import open_store
from preprocess.cli import main as preprocess_main
from preprocess.scan import _time_bound, _TimeUp
from preprocess.volume import MAX_VOXELS, _gunzip


def test_a_few_hundred_damaged_files_each_end_as_a_scan_or_one_line(tmp_path):
    outcomes, broken = fuzz(cases=300, seed=7, folder=tmp_path)
    assert broken == []  # no exception escaped, none over the time bound, one line each
    assert sum(outcomes.values()) == 300
    assert sum(n for (_, kind), n in outcomes.items() if kind == "stored") > 30
    assert sum(n for (_, kind), n in outcomes.items() if kind == "rejected") > 30
    assert {field for field, _ in outcomes} == set(FIELDS)  # every mutation was tried


def test_damaged_files_beside_healthy_ones_are_named_and_the_healthy_stored(tmp_path, capsys):
    inputs = tmp_path / "in"
    healthy = []
    for index in range(3):
        path = write_nifti(inputs / f"healthy{index}.nii.gz", blob_volume(index))
        healthy.append(path.name)
    rng = np.random.default_rng(3)
    starts = sources(tmp_path)
    for index in range(24):
        source = starts[index % len(starts)]
        mutate(source, rng, inputs / f"damaged{index}{''.join(source.suffixes)}")
    code = preprocess_main([str(inputs), "-o", str(tmp_path / "s.h5"), "--volume", "0"])
    assert code in (0, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert all(line.startswith(("rejected: ", "warning: ")) for line in lines), lines
    rejected = {line.split(": ")[1] for line in lines if line.startswith("rejected: ")}
    with open_store(tmp_path / "s.h5") as store:
        stored = {path.split("/")[-1] for path in store.subjects_table()["path"]}
    every = {p.name for p in inputs.iterdir()}
    assert {name.split("/")[-1] for name in rejected} | stored == every
    assert not stored & {name.split("/")[-1] for name in rejected}
    assert set(healthy) <= stored


def test_a_header_claiming_too_many_voxels_is_refused_before_reading(tmp_path, capsys):
    image = nib.load(NIBABEL_DATA / "anatomical.nii")
    header = image.header.copy()
    header["dim"][1:4] = [2000, 2000, 2000]  # 8e9 voxels, 16 GB of int16 the file lacks
    raw = (NIBABEL_DATA / "anatomical.nii").read_bytes()
    path = tmp_path / "in" / "huge.nii.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(header.binaryblock + raw[348:], compresslevel=1))
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "in" / "fine.nii")
    assert preprocess_main([str(tmp_path / "in"), "-o", str(tmp_path / "s.h5")]) == 1
    err = capsys.readouterr().err
    assert "huge.nii.gz: the header claims (2000, 2000, 2000) = 8000000000 voxels, more " in err
    assert "than --max-voxels 268435456" in err


def test_a_gzip_bomb_inflates_no_further_than_its_header_claims(tmp_path, capsys):
    """A real header over 256 MB of zeros (1.2 MB gzipped): reading stops at the claim."""
    raw = (NIBABEL_DATA / "anatomical.nii").read_bytes()  # a header, then its voxels
    image = nib.load(NIBABEL_DATA / "anatomical.nii")
    assert len(raw) == image.dataobj.offset + image.dataobj.get_unscaled().nbytes
    deflate = zlib.compressobj(1, wbits=31)
    zeros = bytes(16 << 20)
    bomb = deflate.compress(raw) + b"".join(deflate.compress(zeros) for _ in range(16))
    path = tmp_path / "in" / "bomb.nii.gz"
    path.parent.mkdir()
    path.write_bytes(bomb + deflate.flush())
    assert path.stat().st_size < 2 << 20  # 1/128 of what it inflates to
    inflated = _gunzip(path.read_bytes(), MAX_VOXELS)
    assert inflated == raw
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "in" / "fine.nii")
    assert preprocess_main([str(tmp_path / "in"), "-o", str(tmp_path / "s.h5")]) == 0
    with open_store(tmp_path / "s.h5") as store:  # the bomb's own voxels are a real scan
        assert len(store.subjects_table()["path"]) == 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_scan_past_its_time_is_left_out_and_the_rest_stored(tmp_path, capsys, workers):
    """Two million header extensions: nibabel parses them in Python for seconds."""
    header = nib.Nifti1Header()
    header.set_data_shape((10, 10, 10))
    header.set_data_dtype(np.int16)
    extensions = struct.pack("<ii", 16, 0) * 2 * 2_000_000  # each: size 16, code 0, 8 bytes
    header["vox_offset"] = 352 + len(extensions)
    slow = tmp_path / "in" / "slow.nii"
    slow.parent.mkdir()
    voxels = blob_volume(0, shape=(10, 10, 10)).astype("<i2").tobytes()
    slow.write_bytes(header.binaryblock + b"\x01\0\0\0" + extensions + voxels)
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "in" / "fine.nii")
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "s.h5"), "--scan-timeout", "0.5"]
    assert preprocess_main([*args, "--workers", workers]) == 1
    err = capsys.readouterr().err
    assert f"rejected: {slow}: not done after 0.5 s (--scan-timeout): left out" in err
    with open_store(tmp_path / "s.h5") as store:
        assert [Path(p).name for p in store.subjects_table()["path"]] == ["fine.nii"]


def test_a_time_up_that_python_drops_rings_again_and_is_not_reported():
    """An alarm landing in ``__del__`` (or a garbage collector's callback) is dropped by
    Python: the bound must still end the scan, without an "Exception ignored" line."""

    class Busy:
        def __del__(self):
            end = time.monotonic() + 0.5
            while time.monotonic() < end:  # the alarm rings in here
                pass

    def scan() -> None:
        with _time_bound(0.1):
            Busy()  # deleted at once
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the second ring lands here
                time.sleep(0.01)

    with pytest.raises(_TimeUp):
        scan()


def test_a_symlink_loop_in_the_inputs_ends_and_each_scan_is_stored_once(tmp_path, capsys):
    inputs = tmp_path / "in"
    write_nifti(inputs / "sub" / "a.nii.gz", blob_volume(1))
    (inputs / "sub" / "loop").symlink_to("..")  # in/sub/loop -> in
    assert preprocess_main([str(inputs), "-o", str(tmp_path / "s.h5")]) == 0
    with open_store(tmp_path / "s.h5") as store:
        assert len(store.subjects_table()["path"]) == 1


def test_a_file_vanishing_after_discovery_is_one_line_and_the_rest_stored(
    tmp_path, capsys, monkeypatch
):
    from preprocess import pipeline

    inputs = tmp_path / "in"
    for index in range(3):
        write_nifti(inputs / f"s{index}.nii.gz", blob_volume(index))
    found = pipeline.find_scans

    def then_delete(*args, **kwargs):
        result = found(*args, **kwargs)
        (inputs / "s1.nii.gz").unlink()  # gone between discovery and reading
        return result

    monkeypatch.setattr(pipeline, "find_scans", then_delete)
    args = [str(inputs), "-o", str(tmp_path / "s.h5"), "--workers", "1"]
    assert preprocess_main(args) == 1
    err = capsys.readouterr().err
    assert "rejected: " in err
    assert "s1.nii.gz: truncated or unreadable data (FileNotFoundError" in err
    assert "Traceback" not in err
    with open_store(tmp_path / "s.h5") as store:
        assert len(store.subjects_table()["path"]) == 2
