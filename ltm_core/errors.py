"""User-facing errors.

Anything a user can fix (a config key, a file, a checkpoint, a prompt) raises `LtmError` with one line that
names what is wrong. The CLI prints that line and exits with code 2; Python callers can catch it.
"""


class LtmError(Exception):
    """An error caused by user input. The message is one actionable line."""

    exit_code = 2  # what the CLI exits with


class ConfigError(LtmError):
    """A config key has a wrong type, an unknown name or an invalid value."""

    def __init__(self, key: str, message: str):
        self.key, self.detail = key, message
        super().__init__(f"config error: {key}: {message}")


class CheckpointError(LtmError):
    """A checkpoint is missing, corrupt or does not fit the requested model."""


class DataError(LtmError):
    """A data file is missing, empty or unreadable."""


class RunStopped(LtmError):
    """A run stopped before its end and saved what it had: a diverging loss, a full disk (exit code 2)."""


class Interrupted(RunStopped):
    """SIGINT / SIGTERM: the run saved a checkpoint at its current step and stopped. The message says where the
    checkpoint is and which command continues the run; the CLI exits with 128 + the signal number (130, 143)."""

    def __init__(self, message: str, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)
