"""User-facing errors: the CLI prints these as one line, never a traceback."""


class ERPDError(Exception):
    """Base class for errors caused by input the user can fix (config, data, checkpoints)."""

    exit_code = 1


class ConfigError(ERPDError):
    """An invalid configuration value; `field` is its dotted path."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class DataError(ERPDError):
    """A malformed dataset row or file."""

    exit_code = 2


class StopRequestedError(ERPDError):
    """A cooperative stop landed where there is nothing to resume from (e.g. pretraining)."""

    exit_code = 3


class CheckpointError(ERPDError):
    """A checkpoint is missing, incomplete or does not match its manifest."""

    exit_code = 2


class DivergedError(ERPDError):
    """Training produced a non-finite loss or gradient: nothing after it is saved."""

    exit_code = 4
