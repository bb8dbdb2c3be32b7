"""User-facing errors.

Anything a user can fix (a config key, a file, a checkpoint, a prompt) raises `LtmError` with one line that
names what is wrong. The CLI prints that line and exits with code 2; Python callers can catch it.
"""


class LtmError(Exception):
    """An error caused by user input. The message is one actionable line."""


class ConfigError(LtmError):
    """A config key has a wrong type, an unknown name or an invalid value."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}")


class CheckpointError(LtmError):
    """A checkpoint is missing, corrupt or does not fit the requested model."""


class DataError(LtmError):
    """A data file is missing, empty or unreadable."""
