"""Raw NIfTI scans -> a chunked HDF5 store of 2-D slices (``python -m preprocess``)."""

from preprocess.errors import PreprocessError
from preprocess.pipeline import Summary, run
from preprocess.settings import RunOptions, Settings

__all__ = ["PreprocessError", "RunOptions", "Settings", "Summary", "run"]
