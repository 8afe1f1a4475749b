"""The schema in one module: stores written by older versions read, newer ones are refused,
the writer writes only what is declared, the reader names what is missing or wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import decode_ids, write_id_store

from loader import H5Sequence, StoreError, open_store, schema

DATA = Path(__file__).parent / "data"
GUIDE = Path(__file__).resolve().parents[1] / "loader" / "README.md"


def test_a_store_written_by_schema_1_code_still_reads():
    # tests/data/schema1.h5 was written by the first version's code (commit "tests/data/schema1.h5")
    with open_store(DATA / "schema1.h5") as store:
        assert store.num_slices == 50
        assert store.slice_shape == (16, 16)
        assert store.class_names == ["control", "patient"]
        assert list(store.splits) == ["train", "val", "unlabelled"]
        assert store.config["size"] == 16
        assert store.scale == pytest.approx(1 / 255)
        table = store.subjects_table()
        assert list(table[schema.SUBJECT_ID]) == ["00", "01", "02", "03", "04"]
        assert list(table[schema.SUBJECT_LABEL]) == [0, 1, 0, 1, -1]
        assert store.uuid == "859669c8-9c74-4131-af0d-377724721286"
        assert store.channel_names == ["T1w"]  # one channel, before schema 3 named them
        assert store.num_channels == 1
        assert store.masks is None
    sequence = H5Sequence(DATA / "schema1.h5", split="train", batch_size=8, shuffle=True)
    assert sequence.channel_names == ["T1w"]
    x, y = sequence[0]
    assert x.shape == (8, 16, 16, 1)
    assert set(y) <= {0, 1}
    assert x.min() >= 0
    assert x.max() <= 1
    # every labelled row once, the unlabelled split left out
    everything = H5Sequence(DATA / "schema1.h5", batch_size=7)
    assert everything.num_slices == 50 - 12


def _copy(tmp_path: Path, name: str = "store.h5") -> Path:
    target = tmp_path / name
    shutil.copy(DATA / "schema1.h5", target)
    return target


def test_a_store_newer_than_this_reader_is_refused_with_the_version_needed(tmp_path):
    path = _copy(tmp_path)
    with h5py.File(path, "r+") as h5:
        h5.attrs[schema.ATTR_SCHEMA] = schema.SCHEMA_VERSION + 1
    message = f"store schema {schema.SCHEMA_VERSION + 1}, newer than this version"
    with pytest.raises(StoreError, match=message):
        open_store(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda h5: h5.__delitem__("subjects/sha256"), r"damaged store: missing /subjects/sha256"),
        (lambda h5: h5.attrs.__delitem__("splits"), r"damaged store: missing root attr `splits`"),
        (
            lambda h5: (h5.__delitem__("slice"), h5.create_dataset("slice", data=np.zeros(3))),
            r"damaged store: /slice is float64, not int16; /slice has shape \(3,\), not \(50,\)",
        ),
    ],
)
def test_the_reader_names_what_is_missing_or_wrong(tmp_path, damage, message):
    path = _copy(tmp_path)
    with h5py.File(path, "r+") as h5:
        damage(h5)
    with pytest.raises(StoreError, match=message):
        open_store(path)


def test_an_entry_added_later_reads_its_default_from_an_older_store(tmp_path, monkeypatch):
    added = schema.Entry("cohort", "", ("str",), (), "a later attribute", since=2, default="none")
    monkeypatch.setattr(schema, "ENTRIES", (*schema.ENTRIES, added))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 2)
    path = _copy(tmp_path)
    with open_store(path) as store:  # schema 1: no `cohort`, and that is no damage
        assert schema.read_attribute(store.file, "cohort") == "none"
    with h5py.File(path, "r+") as h5:
        h5.attrs[schema.ATTR_SCHEMA] = 2  # a schema-2 store must have it
    with pytest.raises(StoreError, match="missing root attr `cohort`"):
        open_store(path)


def test_the_writer_refuses_what_the_schema_does_not_declare(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        with pytest.raises(schema.SchemaError, match="/images: type must be one of"):
            schema.create_dataset(h5, schema.IMAGES, shape=(4, 8, 8), dtype="int64")
        with pytest.raises(schema.SchemaError, match=r"/labels: shape must be \(N,\)"):
            schema.create_dataset(h5, schema.LABELS, np.zeros((2, 2)))
        with pytest.raises(KeyError, match="declares no dataset 'extra'"):
            schema.create_dataset(h5, "extra", np.zeros(2))
        labels = schema.create_dataset(h5, schema.LABELS, np.array([0, 1, -1], dtype=np.int64))
        assert labels.dtype == np.int32  # cast to the declared type


def test_every_store_the_writer_makes_has_no_problem(tmp_path):
    path = write_id_store(tmp_path / "s.h5", scans=4)
    with h5py.File(path, "r") as h5:
        assert schema.problems(h5) == []
        named = [
            e.name for e in schema.ENTRIES if e.is_dataset and "*" not in e.name and not e.optional
        ]
        datasets = []
        h5.visititems(
            lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        assert sorted(datasets) == sorted(named)  # everything declared is written, nothing more


def test_intensities_round_trip_through_the_stored_type(tmp_path):
    values = np.linspace(0, 1, 256, dtype=np.float32)
    for dtype in schema.STORED_DTYPES:
        stored = schema.encode_intensities(values, dtype)
        assert stored.dtype == np.dtype(dtype)
        back = stored.astype(np.float32) * schema.intensity_scale(dtype)
        np.testing.assert_allclose(back, values, atol=0.5 / 255 + 1e-6)
    path = write_id_store(tmp_path / "ids.h5", scans=4)
    x, _ = H5Sequence(path, batch_size=40)[0]
    assert sorted(decode_ids(x)) == list(range(40))


def test_the_loader_guide_schema_table_is_the_declared_schema():
    assert schema.markdown_table() in GUIDE.read_text()
