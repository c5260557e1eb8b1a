"""User-facing errors.

A `UserError` is a problem with what the user gave us (a config, a file, a
command-line argument, a missing package). The CLI prints its message on one
line and exits with status 2, without a traceback. Everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by user input; its message must name the problem."""


class ConfigError(UserError):
    """A malformed or invalid configuration value."""


class DataError(UserError):
    """A malformed dataset, bank file or model output that cannot be used."""
