"""Errors that mean "the user asked for something wrong": reported as one line, no traceback."""


class ConfigError(ValueError):
    """A problem with the job file or run directory, reported before anything heavy starts."""


class StartupError(ConfigError):
    """The cluster cannot run the job as configured: the asked-for resources never appeared
    within `startup_timeout_s`, or an engine actor could not start (out of memory, no model)."""
