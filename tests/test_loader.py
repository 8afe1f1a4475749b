"""H5Sequence and open_store: content, coverage, epochs, splits, processes, refusals."""

from __future__ import annotations

import os
import pickle

import h5py
import keras
import numpy as np
import pytest
from helpers import decode_ids, write_id_store

import loader.rows
import loader.sequence
import loader.store
from loader import H5Sequence, StoreError, open_store
from loader.plan import EpochPlan, aligned_blocks
from loader.store import StoreChangedError, schema

SCANS, PER_SCAN = 12, 20


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    return write_id_store(tmp_path_factory.mktemp("ids") / "ids.h5", SCANS, PER_SCAN)


def _epoch(sequence):
    return [sequence[i] for i in range(len(sequence))]


def test_batches_hold_exactly_the_store_rows_they_name(id_store):
    sequence = H5Sequence(id_store, split="train", batch_size=24, shuffle=True, seed=3)
    with open_store(id_store) as store:
        for index in range(len(sequence)):
            x, y = sequence[index]
            rows = sequence.rows(index)
            assert x.dtype == np.float32
            assert y.dtype == np.int32
            assert x.shape == (len(rows), 64, 64, 1)
            order = np.argsort(rows)
            expected = store.images[rows[order]]  # h5py wants increasing rows
            np.testing.assert_array_equal(x[order, ..., 0], expected * np.float32(store.scale))
            np.testing.assert_array_equal(y[order], store.labels[rows[order]])
            assert (
                store.splits["train"].start <= rows.min() <= rows.max() < store.splits["train"].stop
            )
            np.testing.assert_array_equal(y, decode_ids(x) // PER_SCAN % 2)


def test_every_row_once_per_epoch_epochs_differ_and_seeds_replay(id_store):
    sequence = H5Sequence(id_store, split=None, batch_size=25, shuffle=True, seed=1)
    assert len(sequence) == -(-SCANS * PER_SCAN // 25)
    plans = []
    for _ in range(3):
        batches = _epoch(sequence)
        ids = np.concatenate([decode_ids(x) for x, _ in batches])
        assert sorted(ids) == list(range(SCANS * PER_SCAN))
        assert [len(x) for x, _ in batches] == [25] * (len(sequence) - 1) + [SCANS * PER_SCAN % 25]
        plans.append(ids)
        sequence.on_epoch_end()
    assert not np.array_equal(plans[0], plans[1])
    assert not np.array_equal(plans[1], plans[2])
    replay = H5Sequence(id_store, split=None, batch_size=25, shuffle=True, seed=1)
    np.testing.assert_array_equal(
        np.concatenate([decode_ids(x) for x, _ in _epoch(replay)]), plans[0]
    )
    other = H5Sequence(id_store, split=None, batch_size=25, shuffle=True, seed=2)
    assert not np.array_equal(np.concatenate([other.rows(i) for i in range(len(other))]), plans[0])
    jump = H5Sequence(id_store, split=None, batch_size=25, shuffle=True, seed=1)
    jump.epoch = 2  # straight to the third epoch, as a resumed run does
    ids = np.concatenate([decode_ids(x) for x, _ in _epoch(jump)])
    np.testing.assert_array_equal(ids, plans[2])
    with pytest.raises(ValueError, match="epoch"):
        jump.epoch = -1


def test_unshuffled_batches_are_the_rows_in_order(id_store):
    sequence = H5Sequence(id_store, split="val", batch_size=7)
    with open_store(id_store) as store:
        val = store.splits["val"]
    rows = np.concatenate([sequence.rows(i) for i in range(len(sequence))])
    np.testing.assert_array_equal(rows, np.arange(val.start, val.stop))
    sequence.on_epoch_end()
    np.testing.assert_array_equal(sequence.rows(0), np.arange(val.start, val.start + 7))


def test_batches_are_a_few_chunk_aligned_runs():
    blocks = aligned_blocks([(3, 50), (50, 61)], 8)
    plan = EpochPlan(blocks, batch_size=16, shuffle=True, seed=0, epoch=4)
    runs = [plan.runs(i) for i in range(len(plan))]
    for batch in runs:
        assert len(batch) <= 16 // 8 + 2
        for start, stop in batch:
            assert start // 8 == (stop - 1) // 8 or (start % 8 == 0 and stop % 8 == 0)
    covered = sorted(row for batch in runs for start, stop in batch for row in range(start, stop))
    assert covered == list(range(3, 61))


@pytest.mark.parametrize("split", ["train", "val", None])
def test_shuffled_batches_of_whole_chunks_start_and_end_on_chunk_edges(id_store, split):
    """So a batch reads no chunk in part (a checked chunk is read whole): only the last
    batches, which hold the blocks short of a chunk at the split edges, may."""
    sequence = H5Sequence(id_store, split=split, batch_size=16, shuffle=True, seed=1)
    with open_store(id_store) as store:
        chunk = store.chunk_slices
        edges = {r for s in store.splits.values() for r in (s.start, s.stop)}
    assert chunk == 8
    short = 0
    for index in range(len(sequence)):
        runs = sequence._plan.runs(index)
        whole = all(start % chunk == 0 and stop % chunk == 0 for start, stop in runs)
        if not whole:
            short += 1
            assert index >= len(sequence) - 2, (index, runs)
            assert any(start in edges or stop in edges for start, stop in runs)
    assert short <= 2


def test_split_selection_and_subject_disjointness(id_store):
    train = H5Sequence(id_store, split="train", batch_size=32)
    val = H5Sequence(id_store, split="val", batch_size=32)
    both = H5Sequence(id_store, split=["train", "val"], batch_size=32)
    every = H5Sequence(id_store, batch_size=32)
    assert train.num_slices + val.num_slices == both.num_slices == every.num_slices
    subjects = [
        {int(i) // PER_SCAN for x, _ in _epoch(s) for i in decode_ids(x)} for s in (train, val)
    ]
    assert subjects[0]
    assert subjects[1]
    assert not subjects[0] & subjects[1]
    with pytest.raises(ValueError, match=r"no split 'tset'; the store has \['train', 'val'\]"):
        H5Sequence(id_store, split="tset")
    with pytest.raises(ValueError, match="names a split twice"):
        H5Sequence(id_store, split=["val", "val"])


def test_channels_first_holds_the_same_batches_transposed(id_store):
    kwargs = {"split": "val", "batch_size": 5, "shuffle": True, "seed": 2}
    first = H5Sequence(id_store, channels="first", **kwargs)
    last = H5Sequence(id_store, channels="last", **kwargs)
    for index in range(len(first)):
        (x_first, y_first), (x_last, y_last) = first[index], last[index]
        assert x_first.shape == (len(first.rows(index)), 1, 64, 64)
        assert x_last.shape == (len(last.rows(index)), 64, 64, 1)
        np.testing.assert_array_equal(x_first, np.moveaxis(x_last, -1, 1))
        np.testing.assert_array_equal(y_first, y_last)


def test_properties(id_store):
    sequence = H5Sequence(id_store, split="val", batch_size=5, channels="first", shuffle=True)
    with open_store(id_store) as store:
        assert sequence.store_uuid == store.uuid
        assert sequence.num_slices == len(store.splits["val"])
    assert sequence.class_names == ["a", "b"]
    assert sequence.split == "val"
    assert repr(sequence).startswith(f"H5Sequence({str(id_store)!r}, split='val', batch_size=5")


def test_a_store_without_labels_gives_x_alone(tmp_path):
    path = write_id_store(tmp_path / "u.h5", scans=3, labelled=False)
    sequence = H5Sequence(path, batch_size=16)
    batch = sequence[0]
    assert isinstance(batch, np.ndarray)
    assert batch.shape == (16, 64, 64, 1)
    assert sequence.class_names == []


@pytest.mark.parametrize(("index", "error"), [(-1, IndexError), (99, IndexError), ("0", TypeError)])
def test_bad_batch_indices(id_store, index, error):
    with pytest.raises(error):
        H5Sequence(id_store, batch_size=32)[index]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "`batch_size` must be at least 1; received batch_size=0"),
        ({"batch_size": 2.5}, TypeError, "`batch_size` must be int; received batch_size=2.5"),
        ({"shuffle": "yes"}, TypeError, "`shuffle` must be bool; received shuffle='yes'"),
        ({"channels": "middle"}, ValueError, "`channels` must be one of last, first"),
        ({"split": 3}, TypeError, "`split` must be"),
    ],
)
def test_bad_arguments(id_store, kwargs, error, message):
    with pytest.raises(error, match=message):
        H5Sequence(id_store, **kwargs)


def test_each_call_returns_a_fresh_array(id_store):
    sequence = H5Sequence(id_store, batch_size=16)
    first, _ = sequence[0]
    kept = first.copy()
    second, _ = sequence[0]
    assert first is not second
    assert not np.shares_memory(first, second)
    second[:] = -1
    np.testing.assert_array_equal(first, kept)


def test_pickles_without_open_files(id_store):
    sequence = H5Sequence(id_store, split="train", batch_size=16, shuffle=True)
    first_epoch = sequence[1][0]  # opens the file in this process
    sequence.on_epoch_end()
    copy = pickle.loads(pickle.dumps(sequence))
    assert copy.epoch == 1
    np.testing.assert_array_equal(copy.rows(1), sequence.rows(1))
    np.testing.assert_array_equal(copy[1][0], sequence[1][0])
    assert not np.array_equal(decode_ids(copy[1][0]), decode_ids(first_epoch))


def _id_model():
    """A model whose output is the row id carried by each input."""
    inputs = keras.Input((64, 64, 1))
    outputs = keras.layers.Lambda(lambda x: x[:, 0, :3, 0] * 255.0)(inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("read_mib", [4, 1 / 8])  # one read group; groups of four chunks
@pytest.mark.parametrize("use_multiprocessing", [False, True])
def test_workers_give_exactly_the_batches_of_the_main_process(
    id_store, use_multiprocessing, read_mib
):
    kwargs = {"split": "train", "batch_size": 16, "shuffle": True, "seed": 4, "read_mib": read_mib}
    main = H5Sequence(id_store, **kwargs)
    main[0]  # the parent has read (and opened the file) before the workers fork
    expected = np.concatenate([decode_ids(main[i][0]) for i in range(len(main))])
    parallel = H5Sequence(id_store, **kwargs, workers=2, use_multiprocessing=use_multiprocessing)
    digits = np.rint(_id_model().predict(parallel, verbose=0)).astype(np.int64)
    np.testing.assert_array_equal(
        digits[:, 0] * 65536 + digits[:, 1] * 256 + digits[:, 2], expected
    )


class _Failing(H5Sequence):
    def __getitem__(self, index):
        if index == 2:
            raise RuntimeError("broken batch 2")
        return super().__getitem__(index)


@pytest.mark.parametrize(("workers", "use_multiprocessing"), [(1, False), (2, False), (2, True)])
def test_an_error_inside_getitem_reaches_the_caller(id_store, workers, use_multiprocessing):
    sequence = _Failing(
        id_store, batch_size=16, workers=workers, use_multiprocessing=use_multiprocessing
    )
    # TensorFlow wraps it (tf.errors.UnknownError) but keeps the message and traceback
    with pytest.raises(Exception, match="broken batch 2"):
        _id_model().predict(sequence, verbose=0)


@pytest.mark.parametrize("read_mib", [4, 0.25, 0])  # 0.25: windows of 16 chunks of 56
def test_shuffled_batches_mix_subjects_like_a_random_sample(tmp_path, read_mib):
    path = write_id_store(tmp_path / "many.h5", scans=60, slices_per_scan=30, chunk_slices=32)
    sequence = H5Sequence(
        path, split="train", batch_size=128, shuffle=True, seed=0, read_mib=read_mib
    )
    assert sequence._plan.num_windows == {4: 2, 0.25: 4, 0: 0}[read_mib]  # and the short
    with open_store(path) as store:
        train = store.splits["train"]
        subject_of_row = store.subject[train.start : train.stop]  # one int per row: small
    ours = [
        len(np.unique(subject_of_row[sequence.rows(i) - train.start]))
        for i in range(len(sequence) - 1)
    ]
    rng = np.random.default_rng(0)
    uniform = [len(np.unique(rng.choice(subject_of_row, 128, replace=False))) for _ in range(200)]
    assert np.mean(ours) == pytest.approx(np.mean(uniform), rel=0.10)


@pytest.mark.parametrize(
    ("dtype", "compression"), [("uint8", "lzf"), ("float16", "none"), ("float32", "gzip")]
)
def test_other_dtypes_and_compressed_stores_read_the_same_values(tmp_path, dtype, compression):
    path = write_id_store(tmp_path / "s.h5", scans=4, dtype=dtype, compression=compression)
    sequence = H5Sequence(path, batch_size=16, shuffle=True)
    with open_store(path) as store:
        scale = store.scale
        for index in range(len(sequence)):
            x, _ = sequence[index]
            rows = sequence.rows(index)
            order = np.argsort(rows)
            expected = store.images[rows[order]].astype(np.float32) * np.float32(scale)
            np.testing.assert_array_equal(x[order, ..., 0], expected)
    assert sorted(
        np.concatenate(
            [
                decode_ids(sequence[i][0], 255 if dtype == "uint8" else 1)
                for i in range(len(sequence))
            ]
        )
    ) == list(range(80))


@pytest.mark.parametrize(
    ("dtype", "compression"), [("uint8", "lzf"), ("float16", "none"), ("float32", "gzip")]
)
def test_stored_output_is_the_float32_batch_before_scale_and_offset(tmp_path, dtype, compression):
    path = write_id_store(tmp_path / "s.h5", scans=4, dtype=dtype, compression=compression)
    for channels in ("last", "first"):
        common = {"batch_size": 16, "shuffle": True, "channels": channels}
        floats = H5Sequence(path, **common)
        stored = H5Sequence(path, output="stored", **common)
        assert (stored.output, stored.stored_dtype, floats.output) == ("stored", dtype, "float32")
        assert len(stored) == len(floats) == 5
        for index in range(len(floats)):
            (x, y), (raw, labels) = floats[index], stored[index]
            assert (raw.dtype, raw.shape, x.dtype) == (dtype, x.shape, np.float32)
            scaled = raw.astype(np.float32) * np.float32(stored.scale) + np.float32(stored.offset)
            np.testing.assert_array_equal(scaled, x)
            np.testing.assert_array_equal(labels, y)


def test_stored_output_of_two_channels_with_masks(lesion_store):
    floats = H5Sequence(lesion_store, target="mask", batch_size=32)
    stored = H5Sequence(lesion_store, target="mask", batch_size=32, output="stored")
    assert stored.scale == pytest.approx(1 / 255)
    assert stored.offset == 0
    for index in range(len(floats)):
        (x, masks), (raw, same_masks) = floats[index], stored[index]
        assert raw.dtype == np.uint8
        assert raw.shape[-1] == 2
        np.testing.assert_array_equal(raw * np.float32(stored.scale), x)
        np.testing.assert_array_equal(same_masks, masks)


@pytest.mark.parametrize(("scale", "offset"), [(1 / 255, 0.0), (3.3 / 65535, -0.25)])
def test_intensities_are_the_values_of_the_models_rescaling_layer(scale, offset):
    """``model_input`` (float32 batches; predict, explain and segmentation scoring call it
    with the scale as a Python float) gives every stored value exactly what the Rescaling
    layer of a model fed stored batches gives: float32 arithmetic, not float64 cast back
    (which differs by one unit in the last place for about half of the uint8 values)."""
    stored = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    x = loader.sequence.model_input(stored, scale, offset)
    layer = keras.layers.Rescaling(scale, offset)
    np.testing.assert_array_equal(x, keras.ops.convert_to_numpy(layer(stored.astype(np.float32))))


def test_many_readers_of_one_store_in_one_process(id_store):
    with open_store(id_store) as a, open_store(id_store) as b:
        sequences = [H5Sequence(id_store, batch_size=8) for _ in range(3)]
        assert a.num_slices == b.num_slices
        for sequence in sequences:
            assert len(sequence[0][0]) == 8
        with h5py.File(id_store, "r", locking=False) as plain:
            assert plain[schema.IMAGES].shape[0] == a.num_slices


def test_a_replaced_store_is_noticed(tmp_path):
    path = write_id_store(tmp_path / "s.h5", scans=4)
    sequence = H5Sequence(path, batch_size=8)
    write_id_store(tmp_path / "t.h5", scans=6)
    os.replace(tmp_path / "t.h5", path)
    with pytest.raises(StoreChangedError, match="the store changed"):
        sequence[0]


def _h5(path, complete=True, schema_version=1, with_images=True):
    with h5py.File(path, "w") as h5:
        if schema_version is not None:
            h5.attrs[schema.ATTR_SCHEMA] = schema_version
        if with_images:
            h5.create_dataset(schema.IMAGES, (1, 64, 64), dtype="uint8")
        if complete:
            h5.attrs[schema.ATTR_COMPLETE] = True
    return path


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p: p, FileNotFoundError, "no such store file"),
        (lambda p: (p.write_text("hello"), p)[1], StoreError, "not a readable HDF5 file"),
        (lambda p: _h5(p, schema_version=None), StoreError, "not a store"),
        (lambda p: _h5(p, complete=False), StoreError, "unfinished store"),
        (lambda p: _h5(p, schema_version=7), StoreError, "store schema 7, newer than"),
        (lambda p: _h5(p), StoreError, r"damaged store: .*missing /labels; and 16 more problems"),
    ],
)
def test_open_store_refuses_what_is_not_a_finished_store(tmp_path, make, error, message):
    path = make(tmp_path / "x.h5")
    with pytest.raises(error, match=message):
        open_store(path)
    with pytest.raises(error, match=message):
        H5Sequence(path)


def test_a_store_open_with_other_locking_settings_gets_a_clear_message(id_store):
    message = "already open in this process with other file-locking"
    # h5py's default locking, unlike every reader of ours
    with h5py.File(id_store, "r"), pytest.raises(StoreError, match=message):
        open_store(id_store)


@pytest.mark.parametrize("read_mib", [4, 1 / 8])  # a read group a store; groups of 4 chunks
def test_several_stores_read_as_one(tmp_path, read_mib):
    a = write_id_store(tmp_path / "a.h5", scans=6, seed=1)
    b = write_id_store(tmp_path / "b.h5", scans=8, seed=2, classes="bc")
    both = H5Sequence([a, b], split="train", batch_size=24, shuffle=True, seed=3, read_mib=read_mib)
    assert both.paths == [str(a), str(b)]
    assert both.class_names == ["a", "b", "c"]  # merged by name
    with open_store(a) as store_a, open_store(b) as store_b:
        stores = [store_a, store_b]
        expected = sorted(
            (s, int(row))
            for s, store in enumerate(stores)
            for row in decode_ids(
                store.images[store.splits["train"].start : store.splits["train"].stop][..., None]
                / np.float32(255)
            )
        )
        assert both.num_slices == len(expected)
        seen, mixed = [], 0
        for index in range(len(both)):
            x, y = both[index]
            pairs = both.rows(index)
            for (s, row), image, label in zip(pairs, x, y, strict=True):
                store = stores[s]
                np.testing.assert_array_equal(
                    image[..., 0], store.images[row] * np.float32(1 / 255)
                )
                assert "abc"[label] == store.class_names[store.labels[row]]
            mixed += len(set(pairs[:, 0])) == 2
            seen += [(int(s), int(i)) for s, i in zip(pairs[:, 0], decode_ids(x), strict=True)]
    assert sorted(seen) == expected  # every row of both stores once
    assert mixed >= len(both) // 2  # batches mix the stores
    again = H5Sequence(
        [a, b], split="train", batch_size=24, shuffle=True, seed=3, read_mib=read_mib
    )
    np.testing.assert_array_equal(again.rows(1), both.rows(1))  # a function of (seed, epoch)
    folder = H5Sequence(
        tmp_path, split="train", batch_size=24, shuffle=True, seed=3, read_mib=read_mib
    )
    assert folder.paths == [str(a), str(b)]
    np.testing.assert_array_equal(folder.rows(2), both.rows(2))


def test_stores_that_disagree_on_what_a_slice_means_are_refused(tmp_path):
    a = write_id_store(tmp_path / "a.h5", scans=4)
    b = write_id_store(tmp_path / "b.h5", scans=4, dtype="float16")
    with pytest.raises(
        ValueError, match=r"they differ in stored type: 'uint8' in .*a\.h5, 'float16' in .*b\.h5"
    ):
        H5Sequence([a, b])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder without stores"):
        H5Sequence(tmp_path / "empty")


@pytest.mark.parametrize("stores", [1, 2])
def test_shards_of_an_epoch_are_disjoint_equal_and_cover_it(tmp_path, stores):
    paths = [write_id_store(tmp_path / f"s{k}.h5", scans=7, seed=k) for k in range(stores)]
    kwargs = {"split": None, "batch_size": 16, "shuffle": True, "seed": 5}
    whole = H5Sequence(paths, **kwargs)
    count = 3
    shares = [H5Sequence(paths, shard=(i, count), **kwargs) for i in range(count)]
    assert {len(share) for share in shares} == {len(whole) // count}
    rows = [
        {tuple(np.atleast_1d(r)) for i in range(len(share)) for r in share.rows(i)}
        for share in shares
    ]
    for i in range(count):
        for j in range(i + 1, count):
            assert not rows[i] & rows[j]
    covered = len(set().union(*rows))
    assert whole.num_slices - covered < count * 16  # all but less than one batch per host
    for share in shares:  # each share's batches are the whole epoch's, in turn
        for i in range(len(share)):
            np.testing.assert_array_equal(share.rows(i), whole.rows(i * count + share.shard[0]))
    with pytest.raises(ValueError, match="`shard` must be"):
        H5Sequence(paths, shard=(3, 3))


def test_the_rows_of_scans_are_found_in_blocks_of_subject(id_store, monkeypatch):
    """Rows are shuffled within a split: each scan's rows, whatever the block size of the
    pass over /subject, and an empty list for a scan that has none."""
    with open_store(id_store) as store:
        subject = np.asarray(store.subject[:])  # small test store: read whole to compare
        scans = [0, 3, int(subject.max()), 10_000]
        for block in (7, 64, 1 << 20):
            monkeypatch.setattr(loader.store, "SUBJECT_BLOCK", block)
            found = store.rows_of_scans(scans)
            assert sorted(found) == sorted(scans)
            for scan in scans:
                np.testing.assert_array_equal(found[scan], np.flatnonzero(subject == scan))


def test_read_groups_without_groups_are_the_plain_permutation_of_before():
    """groups=None is the plan every earlier version made: runs resumed with read_mib 0
    (as every run before the setting) read the batches they read then."""
    blocks = aligned_blocks([(0, 96), (96, 101)], 8)
    plan = EpochPlan(blocks, batch_size=16, shuffle=True, seed=2, epoch=5, chunk_rows=8)
    order = np.random.default_rng([2, 5]).permutation(len(blocks))
    short = blocks[order, 1] - blocks[order, 0] < 8
    expected = blocks[np.concatenate([order[~short], order[short]])]
    runs = [run for index in range(len(plan)) for run in plan.runs(index)]
    assert runs == [tuple(block) for block in expected.tolist()]
    assert plan.num_windows == 0


def test_a_grouped_plan_mixes_a_window_of_groups_and_keeps_every_rule():
    blocks = aligned_blocks([(3, 500), (500, 613)], 8)  # short blocks at 3, 500 and 613
    groups = blocks[:, 0] // 8 // 4  # four adjacent chunks a group
    plan = EpochPlan(blocks, 16, True, seed=0, epoch=3, chunk_rows=8, groups=groups, window=3)
    runs = [plan.runs(index) for index in range(len(plan))]
    rows = sorted(r for batch in runs for start, stop in batch for r in range(start, stop))
    assert rows == list(range(3, 613))  # every row once
    whole = [all(start % 8 == 0 == stop % 8 for start, stop in batch) for batch in runs]
    assert all(whole[:-2])
    assert not all(whole)
    windows = [plan.window(index) for index in range(len(plan))]
    assert windows == sorted(windows)
    for index, batch in enumerate(runs[:-2]):  # on its window's groups (and the next's,
        window = windows[index]  # where it starts at the end of one)
        assert len(plan.window_groups(window)) <= 3
        mine = {g for w in (window, window + 1) for g in plan.window_groups(w).tolist()}
        assert {start // 32 for start, _ in batch} <= mine
    assert plan.num_windows == max(windows) + 1
    again = EpochPlan(blocks, 16, True, seed=0, epoch=3, chunk_rows=8, groups=groups, window=3)
    assert [again.runs(index) for index in range(len(again))] == runs  # (seed, epoch)
    other = EpochPlan(blocks, 16, True, seed=0, epoch=4, chunk_rows=8, groups=groups, window=3)
    assert [other.runs(index) for index in range(len(other))] != runs


def test_a_shuffled_epoch_asks_the_disk_for_each_read_group_once_before_reading_it(
    id_store, monkeypatch
):
    """read_mib 1/8 MiB is four chunks of 8 rows of 64 x 64 bytes: every group is asked
    for as one span of the file (images and the subjects of its rows), once an epoch, at or
    before the first batch that reads it; a batch's x holds exactly its rows."""
    monkeypatch.setattr(loader.sequence, "MIX_GROUPS", 2)
    hints = []

    def spy(fd, offset, length, advice):
        hints.append((reading[0], offset, length))

    monkeypatch.setattr(loader.rows.os, "posix_fadvise", spy)
    reading = [None]
    sequence = H5Sequence(id_store, batch_size=16, shuffle=True, seed=4, read_mib=1 / 8)
    assert sequence._plan.num_windows > 2
    store = open_store(id_store)
    layout = loader.rows.row_layout(store.images)
    subjects = loader.rows.row_layout(store.subject)
    chunk = 8 * 64 * 64  # bytes of a chunk of images
    for _ in range(2):
        hints.clear()
        seen = []
        for index in range(len(sequence)):
            reading[0] = index
            x, _ = sequence[index]
            for image, row in zip(x, sequence.rows(index), strict=True):
                np.testing.assert_array_equal(
                    image[..., 0], store.images[row] * np.float32(1 / 255)
                )
            seen += decode_ids(x).tolist()
            for start, _ in sequence._plan.runs(index):
                group = start // 32
                first = [
                    batch
                    for batch, offset, length in hints
                    if offset == int(layout.offsets[group * 4]) and length >= chunk
                ]
                assert first
                assert min(first) <= index
        assert sorted(seen) == list(range(SCANS * PER_SCAN))
        image_hints = [(o, n) for _, o, n in hints if o < int(subjects.offsets[0])]
        assert len(image_hints) == len(set(image_hints)) == -(-SCANS * PER_SCAN // 32)
        chunks = sorted(min(4, 30 - 4 * group) for group in range(8))  # 30 chunks in all
        lengths = sorted(n for _, n in image_hints)  # one read a group (its chunks' span)
        assert all(0 <= n - c * chunk < 4096 for n, c in zip(lengths, chunks, strict=True))
        assert len(hints) == 2 * len(image_hints)  # and each group's subjects
        sequence.on_epoch_end()
    store.close()


def test_read_groups_leave_stores_with_large_chunks_and_sharded_reads_to_single_chunks(
    id_store, monkeypatch
):
    whole = H5Sequence(id_store, batch_size=16, shuffle=True, read_mib=0.03)  # < 2 chunks
    assert whole._groups is None
    plain = H5Sequence(id_store, batch_size=16, shuffle=True, read_mib=0)
    np.testing.assert_array_equal(whole.rows(3), plain.rows(3))
    grouped = H5Sequence(id_store, batch_size=16, shuffle=True, read_mib=1 / 8)
    assert grouped._groups is not None
    assert H5Sequence(id_store, batch_size=16, read_mib=1 / 8)._groups is None  # in order
    assert "read_mib=0.125" in repr(grouped)
    with pytest.raises(ValueError, match="read_mib"):
        H5Sequence(id_store, batch_size=16, read_mib=-1)
    lengths = []
    monkeypatch.setattr(loader.rows.os, "posix_fadvise", lambda fd, o, n, a: lengths.append(n))
    host = H5Sequence(id_store, batch_size=16, shuffle=True, read_mib=1 / 8, shard=(0, 2))
    np.testing.assert_array_equal(host.rows(1), grouped.rows(2))  # the same plan, shared
    for index in range(len(host)):
        host[index]
    assert lengths
    assert max(lengths) <= 8 * 64 * 64  # chunk by chunk: the other host reads the rest
