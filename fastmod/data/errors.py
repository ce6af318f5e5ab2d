"""Errors for bad datasets; messages name the file and the record."""
from __future__ import annotations


class DataError(ValueError):
    """A dataset file is malformed (bad JSON, missing keys, unknown answer, index out of range, corrupt image)."""


class MissingDataError(FileNotFoundError, DataError):
    """A dataset folder or file does not exist (a ``FileNotFoundError`` and a ``ValueError``)."""
