"""The two kinds of error a user sees: a mistake in what they asked, or a failure to do it.

Modules raise subclasses of these for conditions a user can act on; the CLI turns them into one
line and an exit code (2 for a usage error, 1 for a failure) instead of a traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """What the user asked for cannot work as given: a wrong path, setting or output folder."""


class FailureError(RuntimeError):
    """The request was fine but could not be carried out: a server, a model file, a disk."""


class MultiLineError(FailureError):
    """A failure whose message is a list the user needs whole (e.g. every missing weight)."""
