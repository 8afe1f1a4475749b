"""The files of a run folder, named once: every module that reads or writes one asks here."""

from __future__ import annotations

MODEL = "model.keras"  # the best epoch's model
CHECKPOINT = "checkpoint.npz"  # while a run goes, what --resume continues from
HISTORY = "history.csv"  # one row per epoch
METRICS = "metrics.json"  # scores per split; whether the run was interrupted
CONFIG = "config.json"  # settings, target, model, versions, the stores read
PREDICTIONS = "predictions.csv"  # one row per subject of the scored splits
CURVES = "curves.png"
CONFUSION = "confusion.png"  # classification
SCATTER = "scatter.png"  # regression
SEGMENTATION_PICTURE = "segmentation.png"  # segmentation
PICTURES = (CURVES, CONFUSION, SCATTER, SEGMENTATION_PICTURE)
TENSORBOARD = "tensorboard"  # a folder: Keras' TensorBoard logs (--tensorboard)

# What a run folder holds; --overwrite removes these and nothing else.
RUN_FILES = (MODEL, CHECKPOINT, HISTORY, METRICS, CONFIG, *PICTURES, PREDICTIONS)


def stores_read(config: dict) -> list[dict]:
    """The stores a run read, from its ``config.json``: one store is kept as a dict,
    several as a list of them; a config without any gives none.

    >>> stores_read({"store": {"uuid": "a"}}), stores_read({"store": [{"uuid": "a"}, {}]})
    ([{'uuid': 'a'}], [{'uuid': 'a'}, {}])
    """
    stores = config.get("store")
    return [stores] if isinstance(stores, dict) else list(stores or [])
