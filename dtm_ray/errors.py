"""Errors that mean "the user asked for something wrong": reported as one line, no traceback."""


class ConfigError(ValueError):
    """A problem with the job file or run directory, reported before anything heavy starts."""
