"""Reading a store: ``open_store`` (numpy and h5py only) and ``H5Sequence`` (adds Keras).

``H5Sequence`` is imported on first use, so ``import loader.store`` never loads Keras.
"""

from loader.store import Store, StoreError, open_store

__all__ = ["H5Sequence", "Store", "StoreError", "open_store"]


def __getattr__(name: str):
    if name == "H5Sequence":
        from loader.sequence import H5Sequence

        return H5Sequence
    raise AttributeError(f"module 'loader' has no attribute {name!r}")
