"""Train and evaluate a CNN from a store (``python -m training``)."""
