"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""


class FaircalibError(Exception):
    """Base class: something the user can fix (bad path, bad config, bad arguments)."""


class CheckpointError(FaircalibError):
    """A model directory is missing, malformed, or does not match its declared architecture."""


class ConfigError(FaircalibError, ValueError):
    """A configuration value is invalid or inconsistent with another one."""
