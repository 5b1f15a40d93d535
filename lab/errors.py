"""Errors a user can cause. Each becomes one line on stderr and exit code 2."""

from __future__ import annotations


class LabError(Exception):
    """A user-facing error: bad config, bad file, bad command line. Exit code 2."""

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
