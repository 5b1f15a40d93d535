"""Errors, and the exit codes of the ``lab`` command (lab/cli.py maps them; every error is one line on stderr):

- 0: the command did what it was asked.
- 1: a run failed after it started. A non-finite loss or parameters (``NonFiniteError``, lab/loop.py; the
  last good checkpoint is kept); an ``OSError`` while writing (disk full, directory gone; what was saved is
  intact and ``lab resume`` continues); a sweep with a failed job.
- 2: bad input, refused before anything is written: a config field, value or file, a command-line argument,
  a directory that is not a run, an unreadable checkpoint (``LabError`` and its subclasses ``ConfigError``,
  ``CheckpointReadError``).
- 130: interrupted (Ctrl-C); ``lab resume`` continues.

``--debug`` (or ``LAB_DEBUG=1``) shows the traceback instead of the line.
"""

from __future__ import annotations


class LabError(Exception):
    """A user-facing error: bad config, bad file, bad command line. Exit code 2 unless a subclass says."""

    exit_code = 2


class ConfigError(LabError):
    """A config field holds a value that is not allowed."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r}: {allowed}")


def check(cond: bool, field: str, value, allowed: str) -> None:
    """Raise ConfigError(field, value, allowed) unless cond holds."""
    if not cond:
        raise ConfigError(field, value, allowed)
