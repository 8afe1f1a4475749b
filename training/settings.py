"""The settings of a training run, each also an option of ``python -m training``."""

from __future__ import annotations

from dataclasses import dataclass

from loader import table
from loader.options import SettingError, check_settings, option
from loader.plan import READ_MIB
from loader.target import TASKS

AUGMENTATIONS = ("none", "on", "flip")
FEEDS = ("stored", "float32")
CLASS_WEIGHTS = ("none", "balanced")
TARGET = "target (what to predict)"
DATA = "data"
MODEL = "model and fitting"
HOSTS = "several processes or hosts (KERAS_BACKEND=jax)"
# Settings that change how a run goes but not what it computes: a resumed run may change
# them, and run comparisons do not list them as differences.
NOT_COMPUTED = ("workers", "use_multiprocessing", "checkpoint_every", "tensorboard")
# Settings added later, with the value that runs written before them had.
UNWRITTEN = {"feed": "float32", "read_mib": 0.0}


@dataclass(frozen=True)
class Settings:
    """Every setting of a run (written to ``config.json``).

    Each field is also an option of ``python -m training``, generated from the
    declaration below (``--multiprocessing`` for ``use_multiprocessing``).

    Raises:
        SettingError: (a ValueError) a value outside its rule.
        TypeError: a value of the wrong type.
    """

    target: str | None = option(
        None,
        "column of the store's labels table to predict, or mask (segmentation of a "
        "store written with --masks)",
        metavar="COLUMN",
        kind=str,
        default_text="the store's labels (its --label-column)",
        group=TARGET,
    )
    task: str | None = option(
        None,
        "what kind of question",
        choices=TASKS,
        kind=str,
        default_text="from the target: numbers are regression, text classification, mask "
        "segmentation",
        group=TARGET,
    )
    labels: str | None = option(
        None,
        "a .tsv or .csv joined by subject id, for labels that came after preprocessing",
        metavar="FILE",
        kind=str,
        default_text="the store's own table",
        group=TARGET,
    )
    id_column: str = option(
        table.ID_COLUMN, "the subject-id column of --labels", metavar="NAME", group=TARGET
    )
    train_split: tuple[str, ...] = option(
        ("train",),
        "one or more splits to train on, e.g. fold0 fold1 fold2",
        metavar="SPLIT",
        group=DATA,
    )
    val_split: str = option(
        "val", "split for early stopping and validation", metavar="SPLIT", group=DATA
    )
    test_split: str | None = option(
        None,
        "split to test on",
        metavar="SPLIT",
        kind=str,
        default_text="`test` when the store has one",
        group=DATA,
    )
    batch_size: int = option(256, "slices per batch", metavar="N", at_least=1, group=DATA)
    workers: int = option(
        1, "threads (or processes) reading batches", metavar="N", at_least=1, group=DATA
    )
    use_multiprocessing: bool = option(
        False,
        "read batches in processes instead of threads",
        flag="--multiprocessing",
        group=DATA,
    )
    channels: str = option("last", "tensor layout", choices=("last", "first"), group=DATA)
    feed: str = option(
        "stored",
        "what batches carry to the model: the stored values (uint8: a quarter of the bytes, "
        "scaled by the model's first layer) or float32 intensities scaled on the host",
        choices=FEEDS,
        group=DATA,
    )
    read_mib: float = option(
        READ_MIB,
        "MiB of adjacent chunks each shuffled read asks the disk for (0: chunk by chunk, "
        "as runs before this setting)",
        metavar="MIB",
        at_least=0,
        group=DATA,
    )
    epochs: int = option(100, "at most this many epochs", metavar="N", at_least=1, group=MODEL)
    patience: int = option(
        10,
        "early stopping patience (epochs without a better validation score)",
        metavar="N",
        at_least=0,
        group=MODEL,
    )
    learning_rate: float = option(1e-3, "Adam's learning rate", metavar="LR", group=MODEL)
    seed: int = option(
        0, "seed of the weights and the batch order", metavar="S", at_least=0, group=MODEL
    )
    augment: str = option(
        "none",
        "random rotations, shifts, zoom and contrast in training (flip: also left-right flips)",
        choices=AUGMENTATIONS,
        const="on",
        group=MODEL,
    )
    checkpoint_every: int = option(
        0,
        "also write a checkpoint every N batches, not only at epoch ends (0)",
        metavar="N",
        at_least=0,
        group=MODEL,
    )
    class_weight: str = option(
        "none",
        "weigh classes by their inverse frequency in the training splits",
        choices=CLASS_WEIGHTS,
        group=MODEL,
    )
    tensorboard: bool = option(
        False,
        "write TensorBoard logs (scalars per epoch, the model graph) under RUN_DIR/tensorboard/",
        group=MODEL,
    )

    distributed: bool = option(
        False,
        "train data-parallel over several processes with keras.distribution on JAX",
        group=HOSTS,
    )
    coordinator: str | None = option(
        None,
        "HOST:PORT of process 0",
        metavar="HOST:PORT",
        kind=str,
        default_text="from KERAS_DISTRIBUTION_JOB_ADDRESSES or the cluster",
        group=HOSTS,
    )
    num_processes: int | None = option(
        None,
        "how many processes train together",
        metavar="N",
        kind=int,
        at_least=1,
        default_text="from KERAS_DISTRIBUTION_NUM_PROCESSES or the cluster",
        group=HOSTS,
    )
    process_id: int | None = option(
        None,
        "this process's index, from 0",
        metavar="I",
        kind=int,
        at_least=0,
        default_text="from KERAS_DISTRIBUTION_PROCESS_ID or the cluster",
        group=HOSTS,
    )

    def __post_init__(self):
        if isinstance(self.train_split, str | list):  # one name, or a list, from the API
            names = [self.train_split] if isinstance(self.train_split, str) else self.train_split
            object.__setattr__(self, "train_split", tuple(names))
        check_settings(self)
        if not self.learning_rate > 0:
            raise SettingError("{learning_rate} must be positive", learning_rate=self.learning_rate)
        for name in ("val_split", "test_split"):
            if getattr(self, name) in self.train_split:
                raise SettingError(
                    f"{{{name}}} must not be one of {{train_split}}: it would score the model "
                    "on slices it was trained on",
                    train_split=self.train_split,
                    **{name: getattr(self, name)},
                )
        if self.test_split is not None and self.test_split == self.val_split:
            raise SettingError(
                "{test_split} must differ from {val_split}: early stopping chose the model on it",
                test_split=self.test_split,
            )
        if self.labels is not None and self.target is None:
            raise SettingError(
                "{labels} needs {target}: the column of the table to predict", labels=self.labels
            )
        given = [self.coordinator, self.num_processes, self.process_id]
        if not self.distributed and any(value is not None for value in given):
            raise SettingError(
                "{coordinator}, {num_processes} and {process_id} need {distributed}",
                distributed=self.distributed,
            )
        if self.class_weight != "none" and self.task == "regression":
            raise SettingError(
                "{class_weight} is for classification; received task='regression'",
                class_weight=self.class_weight,
            )


def saved_settings(config: dict) -> dict:
    """A run's ``config.json`` settings, with the value a run written before a setting
    existed had (:data:`UNWRITTEN`)."""
    return {**UNWRITTEN, **config.get("settings", {})}
