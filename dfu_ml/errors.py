"""Errors for expected mistakes in user input.

Every class here carries a message that names the file, row, column or parameter at fault and
says what to do. The command-line entry points print the message without a traceback.
"""


class DfuError(Exception):
    """Base class for expected, user-facing errors."""


class DataError(DfuError):
    """A dataset file is missing, malformed or inconsistent."""


class ConfigError(DfuError):
    """A configuration key or value is invalid."""


class StorageError(DfuError):
    """Object storage is unreachable, misconfigured or an object is missing."""


class FoldError(DataError):
    """A cross-validation fold cannot be built as asked (for example it lacks a class)."""
