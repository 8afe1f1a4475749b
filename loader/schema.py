"""The store's schema: every dataset and attribute, declared once, and the checks made of it.

Each :class:`Entry` names one dataset or attribute with its type, its shape rule, what it
means and the schema version that added it. The writer creates everything through
:func:`create_dataset` and :func:`set_attribute`, which refuse what the declaration does
not allow; the reader checks a file with :func:`problems` and fills the defaults of entries
an older store lacks (:func:`read_attribute`); the README's schema table is
:func:`markdown_table` (a test compares them). Only numpy and h5py are imported, so
``preprocess`` can use it.

Shape rules use ``N`` (rows, one per slice), ``M`` (scans, rows of the subjects table),
``S`` (the side of a slice), ``C`` (channels per slice; a last size written ``C?`` is
there only when it is more than one), ``N/K`` (chunks of ``K`` rows, rounded up) and ``P``
(the template planes a standard-space store keeps).

Growing the schema: add entries with ``since=SCHEMA_VERSION + 1`` and a ``default`` for
stores written before, then raise :data:`SCHEMA_VERSION`. A reader accepts every version
up to its own and refuses a newer one with a line naming the version needed.
"""

from __future__ import annotations

import fnmatch
import json
import zlib
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

try:  # the same CRC-32 as zlib's, several times as fast
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    _crc32 = zlib.crc32

SCHEMA_VERSION = 4

# Datasets of N rows, one per slice.
IMAGES = "images"
LABELS = "labels"
MASKS = "masks"
CHECKSUMS = "checksums"
SUBJECT = "subject"
SLICE = "slice"

# The SUBJECTS group: a table of M scans, one dataset per column.
SUBJECTS = "subjects"
SUBJECT_ID = "id"
SESSION = "session"
SOURCE_PATH = "path"
SHA256 = "sha256"
SUBJECT_LABEL = "label"
SUBJECT_SPLIT = "split"
AFFINE = "affine"
SHAPE = "shape"
VOXEL_SIZE = "voxel_size"
TO_TEMPLATE = "to_template"  # schema 4
SIMILARITY = "similarity"  # schema 4
# What /subjects/similarity holds is the template attribute's "similarity" (the correlation
# ratio since it was added); a store that does not say holds the Pearson correlation.
OLD_SIMILARITY = "correlation"

# The TEMPLATE group (schema 4, standard-space stores only): the template's brain, cut as
# the scans' slices are, for drawing its outline over them.
TEMPLATE_BRAIN = "template/brain"
TEMPLATE_SLICE = "template/slice"

# The PARTICIPANTS group (schema 2): the whole labels table, one dataset of M rows per
# column (each scan's subject's value), named by participant_key(column).
PARTICIPANTS = "participants"

# Root attributes.
ATTR_SCHEMA = "schema"
ATTR_UUID = "uuid"
ATTR_CREATED = "created"
ATTR_CONFIG = "config"
ATTR_CLASS_NAMES = "class_names"
ATTR_SPLITS = "splits"
ATTR_COMPLETE = "complete"
ATTR_PARTICIPANT_COLUMNS = "participant_columns"
ATTR_SPACE = "space"  # schema 4
ATTR_TEMPLATE = "template"  # schema 4
SPACES = ("native", "mni")  # the choices of preprocess's --space

# Attributes of IMAGES: a stored value v means the intensity v * scale + offset.
ATTR_SCALE = "scale"
ATTR_OFFSET = "offset"
# Attribute of IMAGES (schema 3): the name of each channel, in order.
ATTR_CHANNELS = "channels"
# Attribute of MASKS (schema 3): the labels that occur in the masks.
ATTR_MASK_LABELS = "labels"

# How the slices may be stored: the types, and the HDF5 compressions of /images.
STORED_DTYPES = ("uint8", "float16", "float32")
COMPRESSIONS = ("none", "lzf", "gzip")
UINT8_SCALE = 1 / 255  # uint8 holds intensities in [0, 1] in steps of 1/255

UNLABELLED = -1  # the label of a slice or scan without a class
# How a stored slice is oriented, by slicing axis (config `axis`): the patient's side at the
# (top, bottom, left, right) of the image. Anterior or superior up, the patient's left on
# the left (the neurological convention).
VIEW_SIDES = {
    "axial": ("A", "P", "L", "R"),
    "coronal": ("S", "I", "L", "R"),
    "sagittal": ("S", "I", "P", "A"),
}

# In a labelled store, the split that holds every unlabelled subject (and only those).
UNLABELLED_SPLIT = "unlabelled"


@dataclass(frozen=True)
class Entry:
    """One dataset or attribute of the store.

    Attributes:
        name: the dataset's path in the file (``subjects/id``), or the attribute's name.
        owner: for an attribute, the path of the object that carries it ("" for the root);
            None for a dataset.
        dtypes: the allowed types: numpy names, ``str``, ``json`` (a JSON string), ``bool``,
            ``int`` or ``float`` (attributes).
        shape: the shape rule of a dataset, with ``N``, ``M``, ``S`` for the sizes.
        meaning: one line for the README.
        since: the schema version that added it.
        default: what a store of an older version reads for it.
        optional: a dataset that only some stores have (``/masks``).
    """

    name: str
    owner: str | None
    dtypes: tuple[str, ...]
    shape: tuple[str | int, ...]
    meaning: str
    since: int = 1
    default: Any = None
    optional: bool = False

    @property
    def is_dataset(self) -> bool:
        """Whether the entry is a dataset (else an attribute)."""
        return self.owner is None

    @property
    def where(self) -> str:
        """Where the entry lives, as the README and messages write it."""
        if self.is_dataset:
            return f"/{self.name}"
        return f"/{self.owner} attr `{self.name}`" if self.owner else f"root attr `{self.name}`"


def _dataset(name, dtypes, shape, meaning, **kwargs) -> Entry:
    return Entry(name, None, tuple(dtypes), tuple(shape), meaning, **kwargs)


def _attribute(owner, name, dtype, meaning, **kwargs) -> Entry:
    return Entry(name, owner, (dtype,), (), meaning, **kwargs)


ENTRIES = (
    _dataset(
        IMAGES, STORED_DTYPES, ("N", "S", "S", "C?"), "the slices, chunks of (K, S, S[, C]) rows"
    ),
    _attribute(IMAGES, ATTR_SCALE, "float", "intensity = stored * scale + offset (uint8: 1/255)"),
    _attribute(IMAGES, ATTR_OFFSET, "float", "see `scale`"),
    _attribute(
        IMAGES,
        ATTR_CHANNELS,
        "json",
        "channel names: modality-major, `T1w-1`, `T1w+0`, `T1w+1` with --context 1",
        since=3,
        default=[],
    ),
    _dataset(
        MASKS,
        ["uint8"],
        ("N", "S", "S"),
        "label mask per slice (0 background), chunked as /images; with --masks only",
        since=3,
        optional=True,
    ),
    _attribute(MASKS, ATTR_MASK_LABELS, "json", "the labels found in the masks, sorted", since=3),
    _dataset(
        CHECKSUMS,
        ["uint32"],
        ["N/K"],
        "CRC-32 of each /images chunk (K rows) as uncompressed bytes",
        since=3,
    ),
    _dataset(LABELS, ["int32"], ["N"], "class index per slice, -1 where unlabelled"),
    _dataset(SUBJECT, ["int32"], ["N"], "row in the subjects table (one row per scan)"),
    _dataset(SLICE, ["int16"], ["N"], "position of the slice along the canonical volume's axis"),
    _dataset(f"{SUBJECTS}/{SUBJECT_ID}", ["str"], ["M"], "subject id (without `sub-`)"),
    _dataset(f"{SUBJECTS}/{SESSION}", ["str"], ["M"], 'session (without `ses-`), "" if none'),
    _dataset(
        f"{SUBJECTS}/{SOURCE_PATH}",
        ["str"],
        ["M"],
        "the scan's path, relative to its input's parent",
    ),
    _dataset(f"{SUBJECTS}/{SHA256}", ["str"], ["M"], "of the source file"),
    _dataset(f"{SUBJECTS}/{SUBJECT_LABEL}", ["int32"], ["M"], "class index, -1 if unlabelled"),
    _dataset(f"{SUBJECTS}/{SUBJECT_SPLIT}", ["str"], ["M"], "the scan's split"),
    _dataset(
        f"{SUBJECTS}/{AFFINE}", ["float64"], ("M", 4, 4), "voxel-to-world of the canonical volume"
    ),
    _dataset(f"{SUBJECTS}/{SHAPE}", ["int32"], ("M", 3), "shape of the canonical volume"),
    _dataset(f"{SUBJECTS}/{VOXEL_SIZE}", ["float32"], ("M", 3), "mm, of the canonical volume"),
    _dataset(
        f"{SUBJECTS}/{TO_TEMPLATE}",
        ["float64"],
        ("M", 4, 4),
        "scanner world (mm) -> template world, the registration; NaN in native space",
        since=4,
        default=np.nan,
    ),
    _dataset(
        f"{SUBJECTS}/{SIMILARITY}",
        ["float32"],
        ["M"],
        "how well the registered scan predicts the template in its brain, 0-1 (the template "
        "attribute's `similarity` names the measure); NaN in native space",
        since=4,
        default=np.nan,
    ),
    _dataset(
        TEMPLATE_BRAIN,
        ["uint8"],
        ("P", "S", "S"),
        "the template's brain (1) cut at each kept plane as the slices are; --space mni only",
        since=4,
        optional=True,
    ),
    _dataset(
        TEMPLATE_SLICE,
        ["int16"],
        ["P"],
        "the template plane of each row of /template/brain, the same numbers as /slice",
        since=4,
        optional=True,
    ),
    _attribute("", ATTR_SCHEMA, "int", "the schema version the store was written with"),
    _attribute("", ATTR_UUID, "str", "new for every store written"),
    _attribute("", ATTR_CREATED, "str", "ISO 8601, UTC"),
    _attribute("", ATTR_CONFIG, "json", "every preprocessing setting and the inputs"),
    _attribute("", ATTR_CLASS_NAMES, "json", "label k means `class_names[k]`"),
    _attribute("", ATTR_SPLITS, "json", "`{name: [start, stop)}`, contiguous row ranges in order"),
    _attribute("", ATTR_COMPLETE, "bool", "set last; a store without it is refused"),
    _attribute(
        "",
        ATTR_SPACE,
        "str",
        "`native` (each scan's own grid) or `mni` (registered to the template)",
        since=4,
        default="native",
    ),
    _attribute(
        "",
        ATTR_TEMPLATE,
        "json",
        "`mni`: the template's name, file, shape, affine, axis, kept planes and similarity "
        "measure (`correlation ratio`; absent: `correlation`); else null",
        since=4,
        default=None,
    ),
    _dataset(
        f"{PARTICIPANTS}/*",
        ["float64", "str"],
        ["M"],
        'one column of the labels table each: numbers (NaN where missing) or text ("")',
        since=2,
    ),
    _attribute(
        "",
        ATTR_PARTICIPANT_COLUMNS,
        "json",
        '`[[column, "numeric" or "categorical"], ...]` in the table\'s order',
        since=2,
        default=[],
    ),
)


def participant_key(column: str) -> str:
    """The dataset name of a labels-table column under /participants (HDF5 names lack "/").

    >>> participant_key("weight/kg")
    'weight_kg'
    """
    return column.replace("/", "_")


SUBJECT_COLUMNS = tuple(
    e.name.split("/", 1)[1] for e in ENTRIES if e.name.startswith(f"{SUBJECTS}/")
)


class SchemaError(ValueError):
    """A value that does not fit the schema's declaration (a bug in the writer)."""


def entry(name: str, owner: str | None = None) -> Entry:
    """The declaration of a dataset (``owner=None``) or of an attribute of ``owner``.

    >>> entry("labels").dtypes
    ('int32',)
    >>> entry("scale", owner="images").where
    '/images attr `scale`'
    """
    for candidate in ENTRIES:
        if candidate.owner == owner and fnmatch.fnmatchcase(name, candidate.name):
            return candidate
    raise KeyError(f"the schema declares no {'dataset' if owner is None else 'attribute'} {name!r}")


def channel_names(suffixes, context: int = 0) -> list[str]:
    """The channels of a slice: modality-major, each with its neighbours (``--context``).

    >>> channel_names(["T1w", "FLAIR"], 1)
    ['T1w-1', 'T1w+0', 'T1w+1', 'FLAIR-1', 'FLAIR+0', 'FLAIR+1']
    >>> channel_names("T1w")
    ['T1w']
    """
    suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
    if context == 0:
        return suffixes
    return [f"{name}{offset:+d}" for name in suffixes for offset in range(-context, context + 1)]


def checksum(rows: np.ndarray) -> int:
    """CRC-32 of rows' bytes as stored (ISA-L's, about 18 GB/s here; zlib's where absent).

    >>> checksum(np.zeros((2, 2), np.uint8))
    558161692
    """
    return _crc32(memoryview(np.ascontiguousarray(rows)).cast("B"))


def chunk_checksums(rows: np.ndarray, chunk: int) -> list[int]:
    """The checksum of every ``chunk`` rows of ``rows`` (the last may be shorter)."""
    return [checksum(rows[start : start + chunk]) for start in range(0, len(rows), chunk)]


def intensity_scale(dtype: str) -> float:
    """The ``scale`` of a stored type: intensity = stored value * scale.

    >>> intensity_scale("uint8") == 1 / 255, intensity_scale("float16")
    (True, 1.0)
    """
    return UINT8_SCALE if dtype == "uint8" else 1.0


def encode_intensities(slices: np.ndarray, dtype: str) -> np.ndarray:
    """Slices of float intensities in their stored type (the inverse of ``scale``).

    uint8 holds [0, 1] in steps of 1/255 (values outside are clipped).

    >>> encode_intensities(np.array([0.0, 0.5, 1.2]), "uint8").tolist()
    [0, 128, 255]
    """
    if dtype not in STORED_DTYPES:
        raise SchemaError(
            f"stored type must be one of {', '.join(STORED_DTYPES)}; received {dtype!r}"
        )
    if dtype == "uint8":
        return np.rint(np.clip(slices, 0, 1) / UINT8_SCALE).astype(np.uint8)
    return np.asarray(slices).astype(dtype)


def create_dataset(h5: h5py.File | h5py.Group, name: str, data=None, **options) -> h5py.Dataset:
    """Create a declared dataset, in the declared type.

    Args:
        h5: the file being written.
        name: the dataset's path, as declared.
        data: its values (cast to the declared type), or None with ``shape`` and ``dtype``
            in ``options``.
        **options: passed to ``h5py.Group.create_dataset`` (chunks, compression, ...).

    Raises:
        SchemaError: a type the declaration does not allow, or a shape of another rank.
    """
    declared = entry(name)
    if data is not None:
        data = np.asarray(data)
        if data.dtype.kind in "OUS":  # text
            if "str" not in declared.dtypes:
                raise _type_error(declared, "str")
            data = data.astype(object)
            options["dtype"] = h5py.string_dtype()
        else:
            wanted = np.dtype(options.pop("dtype", None) or declared.dtypes[0])
            if wanted.name not in declared.dtypes:
                raise _type_error(declared, wanted)
            data = data.astype(wanted, copy=False)
        shape = data.shape
    else:
        shape = options["shape"]
        if np.dtype(options["dtype"]).name not in declared.dtypes:
            raise _type_error(declared, options["dtype"])
    if declared.shape[-1:] == ("C?",):
        ranks = {len(declared.shape) - 1, len(declared.shape)}
    else:
        ranks = {len(declared.shape)}
    if len(shape) not in ranks:
        raise SchemaError(f"{declared.where}: shape must be {_rule(declared)}; received {shape}")
    return h5.create_dataset(name, data=data, **options)


def _type_error(declared: Entry, received) -> SchemaError:
    return SchemaError(
        f"{declared.where}: type must be one of {', '.join(declared.dtypes)}; received {received}"
    )


def set_attribute(h5: h5py.File, name: str, value, owner: str = "") -> None:
    """Set a declared attribute of the root (``owner=""``) or of a dataset; JSON is encoded here."""
    declared = entry(name, owner)
    kind = declared.dtypes[0]
    if kind == "json":
        value = json.dumps(value)
    elif kind in ("int", "float", "bool", "str"):
        value = {"int": int, "float": float, "bool": bool, "str": str}[kind](value)
    (h5[owner] if owner else h5).attrs[name] = value


def read_attribute(h5: h5py.File, name: str, owner: str = ""):
    """A declared attribute, JSON decoded; its default when the store predates it.

    Raises:
        KeyError: the attribute is missing although the store's version has it.
    """
    declared = entry(name, owner)
    attrs = (h5[owner] if owner else h5).attrs
    if name not in attrs:
        if declared.since > store_version(h5):
            return declared.default
        raise KeyError(f"missing {declared.where}")
    value = attrs[name]
    return json.loads(value) if declared.dtypes[0] == "json" else value


def store_version(h5: h5py.File) -> int:
    """The schema version a store was written with (0 when it has none)."""
    return int(h5.attrs.get(ATTR_SCHEMA, 0))


def problems(h5: h5py.File) -> list[str]:
    """What is wrong with a store, in one line; an empty list for a good one.

    Checks the version, the ``complete`` flag, and the presence, type and shape of every
    entry the store's version declares (no data is read beyond the attributes).
    """
    version = store_version(h5)
    if version == 0 or IMAGES not in h5:
        return [f"not a store: no `{ATTR_SCHEMA}` attribute or /{IMAGES}"]
    if version > SCHEMA_VERSION:
        return [
            f"written with store schema {version}, newer than this version of slicestore "
            f"reads (schema 1 to {SCHEMA_VERSION}): upgrade slicestore to read it"
        ]
    if not h5.attrs.get(ATTR_COMPLETE, False):
        return [
            f"unfinished store (no `{ATTR_COMPLETE}` flag): the run that wrote it did not "
            "finish; rerun preprocess"
        ]
    found = []
    images = h5[IMAGES].shape
    sizes = {"N": images[0], "S": images[1], "C?": images[3] if len(images) == 4 else None}
    rows = h5[IMAGES].chunks[0] if h5[IMAGES].chunks else max(images[0], 1)
    sizes["N/K"] = -(-images[0] // rows)
    if f"{SUBJECTS}/{SUBJECT_ID}" in h5:
        sizes["M"] = h5[f"{SUBJECTS}/{SUBJECT_ID}"].shape[0]
    if TEMPLATE_SLICE in h5:
        sizes["P"] = h5[TEMPLATE_SLICE].shape[0]
    for declared in ENTRIES:
        if declared.since > version:
            continue
        if declared.is_dataset:
            group, _, name = declared.name.rpartition("/")
            if name == "*":  # one dataset per member of a group, none required
                names = [f"{group}/{key}" for key in h5.get(group, {})]
            elif declared.name in h5:
                names = [declared.name]
            elif declared.optional:
                continue
            else:
                found.append(f"missing {declared.where}")
                continue
            for path in names:
                found += _dataset_problems(h5[path], declared, sizes)
        else:
            if declared.owner and declared.owner not in h5:  # an optional dataset's
                continue
            owner = h5[declared.owner] if declared.owner else h5
            if declared.name not in owner.attrs:
                found.append(f"missing {declared.where}")
    if len(found) > 4:  # one line: the first few, and how many more
        found = [*found[:3], f"and {len(found) - 3} more problems"]
    return ["damaged store: " + "; ".join(found)] if found else []


def _dataset_problems(dataset: h5py.Dataset, declared: Entry, sizes: dict) -> list[str]:
    found = []
    kind = "str" if h5py.check_string_dtype(dataset.dtype) else dataset.dtype.name
    if kind not in declared.dtypes:
        found.append(f"{dataset.name} is {kind}, not {' or '.join(declared.dtypes)}")
    expected = tuple(sizes.get(n, n) if isinstance(n, str) else n for n in declared.shape)
    if expected and expected[-1] is None:  # one channel: no channel axis
        expected = expected[:-1]
    if dataset.shape != expected or 1 in expected[3:]:
        found.append(f"{dataset.name} has shape {dataset.shape}, not {expected}")
    return found


def _rule(declared: Entry) -> str:
    return (
        "(" + ", ".join(map(str, declared.shape)) + ("," if len(declared.shape) == 1 else "") + ")"
    )


def markdown_table() -> str:
    """The schema as the README's table (a test keeps the README equal to it)."""
    lines = ["| path | shape, type | meaning | since |", "| --- | --- | --- | --- |"]
    for declared in ENTRIES:
        kind = " \\| ".join(declared.dtypes)
        shape = f"{_rule(declared)} {kind}" if declared.is_dataset else kind
        lines.append(f"| {declared.where} | {shape} | {declared.meaning} | {declared.since} |")
    return "\n".join(lines)
