"""Raw NIfTI scans -> a chunked HDF5 store of 2-D slices (``python -m preprocess``).

The pipeline (numpy, scipy, nibabel, h5py) is imported on first use of its names, so
``python -m preprocess`` can start its workers' server before importing it.
"""

from preprocess.errors import PreprocessError

__all__ = ["PreprocessError", "RunOptions", "Settings", "Summary", "run"]


def __getattr__(name: str):
    if name in ("RunOptions", "Settings", "Summary", "run"):
        from preprocess import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'preprocess' has no attribute {name!r}")
