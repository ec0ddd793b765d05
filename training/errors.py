"""Domain errors shared by training, serving and convert: each maps to one clear message."""


class LoraplexError(Exception):
    """Base class: the CLI prints `error: <message>` and exits non-zero, never a traceback."""


class DataError(LoraplexError):
    """A dataset file is missing, malformed or empty."""


class ConfigError(LoraplexError):
    """A flag or recipe value is invalid."""


class InvalidAdapterId(LoraplexError):
    """An adapter ID is not a safe name."""


class BaseMismatch(LoraplexError):
    """An adapter or checkpoint was made against a different base model."""
