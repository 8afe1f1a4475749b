"""The error of training: a ``ValueError`` whose message is the one line to show."""


class TrainingError(ValueError):
    """A run that cannot start or go on; the message says what, why and what to do."""
