"""Errors a user can cause. Each message is one line: what was wrong, the value, the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class MoecoError(Exception):
    """Base class for every error caused by user input (configs, files, command-line values)."""


class ConfigError(MoecoError, ValueError):
    """An invalid model, training or hardware configuration value."""


class LoadError(MoecoError):
    """A checkpoint that cannot be loaded: missing, unexpected or mis-shaped tensors, bad files."""


class DataError(MoecoError):
    """Training data that cannot be used: missing path, empty corpus, bad JSONL."""


class StorageError(MoecoError):
    """The disk refused a write (full, over quota): the path and the space needed are named."""


class TrainingError(MoecoError):
    """A run that cannot go on: a loss that stayed NaN or infinite."""
