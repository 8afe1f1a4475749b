"""Finding scans and labels in BIDS, class-folder and plain trees; splits per subject."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import blob_volume, write_nifti

from loader.table import ID_COLUMN, class_names
from preprocess.discover import InputError, column_of, discover, find_layout, read_subjects_table
from preprocess.splits import assign_splits, row_order


def _touch(path, seed=0):
    return write_nifti(path, blob_volume(seed, shape=(6, 6, 6)))


def test_bids_tree_gives_subject_and_session_and_skips_derivatives(tmp_path):
    root = tmp_path / "ds"
    _touch(root / "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz")
    _touch(root / "sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz")
    _touch(root / "sub-02/anat/sub-02_T1w.nii")
    _touch(root / "sub-02/anat/sub-02_T2w.nii.gz")
    _touch(root / "derivatives/x/sub-02/anat/sub-02_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tAD\nsub-02\tn/a\n")
    assert find_layout(root) == "bids"
    scans, rejected = discover([root])
    assert rejected == []
    assert [(s.subject_id, s.session, s.source) for s in scans] == [
        ("01", "a", "ds/sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz"),
        ("01", "b", "ds/sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz"),
        ("02", "", "ds/sub-02/anat/sub-02_T1w.nii"),
    ]
    t2, _ = discover([root], suffix="T2w")
    assert [s.source for s in t2] == ["ds/sub-02/anat/sub-02_T2w.nii.gz"]
    assert read_label_table(root / "participants.tsv", "group") == {"01": "AD", "02": None}


def test_class_folders_give_labels_like_image_dataset_from_directory(tmp_path):
    root = tmp_path / "data"
    _touch(root / "patient/a.nii.gz")
    _touch(root / "patient/deeper/b.nii")
    _touch(root / "control/c.nii.gz")
    (root / "control/notes.txt").write_text("ignored")
    _touch(root / "control/.hidden.nii")
    assert find_layout(root) == "classes"
    scans, _ = discover([root])
    assert [(s.source, s.label, s.subject_id) for s in scans] == [
        ("data/control/c.nii.gz", "control", "data/control/c"),
        ("data/patient/a.nii.gz", "patient", "data/patient/a"),
        ("data/patient/deeper/b.nii", "patient", "data/patient/deeper/b"),
    ]
    plain, _ = discover([root], layout="plain")
    assert {s.label for s in plain} == {None}


def test_plain_folder_and_files_take_subject_from_sub_entity(tmp_path):
    _touch(tmp_path / "in/sub-07_run-1_T1w.nii.gz")
    _touch(tmp_path / "in/sub-07_run-2_T1w.nii.gz")
    _touch(tmp_path / "in/scan.nii")
    (tmp_path / "readme.txt").write_text("x")
    assert find_layout(tmp_path / "in") == "plain"
    scans, rejected = discover([tmp_path / "in", tmp_path / "readme.txt"])
    assert [s.subject_id for s in scans] == ["in/scan", "07", "07"]
    assert rejected == [
        (
            str(tmp_path / "readme.txt"),
            "not an image: the name does not end in .nii, .nii.gz, .mgz, .mgh or .hdr, and it "
            "is not DICOM",
        )
    ]


def test_the_same_file_twice_is_taken_once_and_missing_inputs_are_errors(tmp_path):
    path = _touch(tmp_path / "in/a.nii")
    scans, _ = discover([tmp_path / "in", path])
    assert len(scans) == 1
    with pytest.raises(InputError, match="no such file or folder"):
        discover([tmp_path / "missing"])
    other = _touch(tmp_path / "other/a.nii")  # another file of the same name
    with pytest.raises(InputError, match=r"has the same name as .*give the inputs as their parent"):
        discover([path, other])


def test_label_table_csv_and_missing_column(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("participant_id,dx\n01,1\nsub-02,0\n03,\n")
    assert read_label_table(table, "dx") == {"01": "1", "02": "0", "03": None}
    with pytest.raises(
        InputError, match=r"no column 'group'; the columns are \['dx', 'participant_id'\]"
    ):
        read_label_table(table, "group")


def read_label_table(path, column):
    """One column of a labels table, as preprocess reads it."""
    return column_of(read_subjects_table(path), column, path, ID_COLUMN)


def test_class_names_sort_numbers_numerically():
    assert class_names(["10", "9", None]) == ["9", "10"]


def _subjects(per_class, classes=2):
    return {f"{c}-{i:02d}": c for c in range(classes) for i in range(per_class)}


def test_splits_are_per_subject_stratified_and_seeded():
    subjects = _subjects(10)
    splits = assign_splits(subjects, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert set(splits) == set(subjects)
    for name in ("train", "val", "test"):
        assert {subjects[s] for s, split in splits.items() if split == name} == {0, 1}
    counts = {
        name: sum(1 for v in splits.values() if v == name) for name in ("train", "val", "test")
    }
    assert counts == {"train": 12, "val": 4, "test": 4}
    assert assign_splits(subjects, 0.2, 0.2, seed=1) == splits
    assert assign_splits(subjects, 0.2, 0.2, seed=2) != splits


def test_small_classes_still_reach_every_split_or_warn():
    splits = assign_splits(_subjects(3), val_fraction=0.1, test_fraction=0.1)
    for name in ("train", "val", "test"):
        assert {int(s[0]) for s, v in splits.items() if v == name} == {0, 1}
    with pytest.warns(UserWarning, match="too few for one in every split"):
        assign_splits(_subjects(1), val_fraction=0.2)


def test_folds_balance_classes_and_unlabelled_subjects_stand_apart():
    subjects = _subjects(6, classes=3) | {"x": -1}
    splits = assign_splits(subjects, folds=3)
    assert splits["x"] == "unlabelled"
    for k in range(3):
        members = [s for s, v in splits.items() if v == f"fold{k}"]
        assert sorted(subjects[s] for s in members) == [0, 0, 1, 1, 2, 2]


def test_row_order_is_split_by_split_and_a_permutation():
    row_splits = np.array([1, 0, 0, 2, 1, 0, 2, 2, 0])
    destination, ranges = row_order(row_splits, ["train", "val", "test"], seed=0)
    assert sorted(destination) == list(range(9))
    assert ranges == {"train": [0, 4], "val": [4, 6], "test": [6, 9]}
    for index, (start, stop) in enumerate(ranges.values()):
        assert set(destination[row_splits == index]) == set(range(start, stop))
