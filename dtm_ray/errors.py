"""Errors that mean "the user asked for something wrong": the CLI reports them as one line with
exit code 2 and no traceback. Any other exception is a bug: the CLI says so in one line and
keeps its traceback (see `dtm_ray.cli`)."""


class UserError(Exception):
    """Something the user gave (a job, a run directory, a name) is wrong; the message says what
    and what was expected."""


class ConfigError(UserError, ValueError):
    """A problem with the job file or run directory, reported before anything heavy starts."""


class StartupError(ConfigError):
    """The cluster cannot run the job as configured: the asked-for resources never appeared
    within `startup_timeout_s`, or an engine actor could not start (out of memory, no model)."""


class StorageError(Exception):
    """The run directory (or an export folder) cannot be written: no space, no permission, a
    bucket that is gone, credentials that expired, or a store that kept failing through every
    retry. Not the user's mistake in the job, and not a bug: the run stops, what was written
    stays readable, and the same command resumes once storage is back."""
