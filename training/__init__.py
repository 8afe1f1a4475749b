"""Train and evaluate a CNN from a store (``python -m training``); apply it to new scans
(``training.predict``, ``python -m training predict``).

``training.train`` and its :class:`~training.settings.Settings` are imported on first use,
so ``python -m training`` can quiet TensorFlow's start-up logging before Keras loads.
"""

__all__ = ["Prediction", "Result", "Settings", "TrainingError", "predict", "train"]


def __getattr__(name: str):
    if name in ("predict", "Prediction"):
        from training import inference

        return getattr(inference, name)
    if name in __all__:
        from training import run

        return getattr(run, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
