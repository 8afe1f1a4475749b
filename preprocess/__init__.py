"""Raw NIfTI scans -> a chunked HDF5 store of 2-D slices (``python -m preprocess``)."""

from preprocess.pipeline import Settings, Summary, run

__all__ = ["Settings", "Summary", "run"]
