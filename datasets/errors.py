"""The project's exception hierarchy: every error a user can cause derives from `StudyError`.

Command-line entry points catch `StudyError`, print its message and exit with status 2, so bad
input never ends in a library traceback.
"""

from __future__ import annotations


class StudyError(Exception):
    """Root of every error this project raises on purpose."""


class InputError(StudyError, ValueError):
    """User input (a flag, a file, a table) is not what was expected."""


class ClinicalTableError(InputError):
    """The clinical CSV cannot be used as a whole (missing column, duplicate ids, unreadable)."""


class ImageError(InputError):
    """One patient's image file cannot be used."""


class StoreError(StudyError):
    """A cohort store is missing, of an unknown version, or damaged."""
