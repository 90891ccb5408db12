"""Errors a user can act on: each names the file, line, key or tensor at fault and what was expected."""


class SFTError(Exception):
    """Base class for every user-facing error of the suite."""


class ConfigError(SFTError):
    """A YAML/flag/config.json value is missing, unknown or of the wrong type."""


class DataError(SFTError):
    """A dataset file or record cannot be read as the expected format."""


class CheckpointError(SFTError):
    """A checkpoint file is missing, truncated, or does not fit the model (names, shapes)."""


class TrainingError(SFTError):
    """Training cannot go on (NaN/Inf loss, impossible plan, ...)."""
