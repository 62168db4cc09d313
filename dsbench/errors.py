"""Bad input, as exceptions: every one says in one line the field, the value and what is allowed.

The CLI catches `UserError`, prints the line and exits 2 with no traceback; anything else that
escapes is a bug in dsbench and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input dsbench cannot use, in one line (exit 2)."""


class SpecError(UserError):
    """A spec problem, in one line: key, value, what is allowed."""


class UsageError(UserError):
    """A command-line or folder problem, in one line (exit 2)."""


class DataError(UserError):
    """A data source or request that cannot give batches, in one line naming the source."""


class ResultsError(UserError):
    """A results folder that cannot be read, in one line."""


class PolicyError(UserError):
    """A policy file that cannot be used, in one line: key, value, what is allowed."""


class OfficialConfigError(UserError):
    """An official config that cannot be read, in one line."""


class AbError(UserError):
    """A usage problem of the A/B run, in one line (exit 2)."""
