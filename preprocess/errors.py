"""The errors of preprocessing: one base, a ``ValueError``, whose message is the line to show.

``InputError``: the inputs as a whole cannot be used (nothing is written). ``ScanError``:
one scan cannot be used (it is named with the reason and the others are written).
Problems with paths are ``FileNotFoundError`` / ``FileExistsError``; settings out of their
rules are :class:`loader.options.SettingError`.
"""


class PreprocessError(ValueError):
    """Preprocessing cannot go on; the message says what, why and what to do."""


class InputError(PreprocessError):
    """A problem with the inputs as a whole (a usage error): nothing can be written."""


class ScanError(PreprocessError):
    """A scan that cannot be used; the message says why."""
