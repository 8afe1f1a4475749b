"""Raw NIfTI scans -> a chunked HDF5 store of 2-D slices (``python -m preprocess``)."""

from preprocess.errors import PreprocessError
from preprocess.pipeline import RunOptions, Settings, Summary, run

__all__ = ["PreprocessError", "RunOptions", "Settings", "Summary", "run"]
