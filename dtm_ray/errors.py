"""Errors that mean "the user asked for something wrong": the CLI reports them as one line with
exit code 2 and no traceback. Any other exception is a bug: the CLI says so in one line and
keeps its traceback (see `dtm_ray.cli`). Storage failures (`StorageError`, exit 1) are neither:
the one mapping from a failed write to its one-line message lives here too."""

from __future__ import annotations

import errno
import os
import re
import sys


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


class MissingRequirement(UserError):
    """A third-party module this process needs is not installed in its Python: the node's image
    lacks the requirements. Not the job's fault and not a bug."""


# --- storage failures: one mapping for every writer ----------------------------------------
# Run tables, reports, exports, evaluation outputs and the model cache all map a failing write
# through these functions (with the retries of `dtm_ray.records.store.retrying`), so a full disk
# reads the same wherever it strikes. Pure: no I/O, no third-party import.

ADVICE = "run the same command again to resume once storage is back"
# Failures that will not go away by trying again: no space, no quota, no permission, read-only.
PERSISTENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
# How persistent failures read where no errno is set (pyarrow's S3 and GCS clients, boto3).
PERSISTENT_WORDS = (
    "no space left",
    "disk quota",
    "permission denied",
    "read-only file system",
    "access_denied",
    "accessdenied",
    "no_such_bucket",
    "nosuchbucket",
    "invalidaccesskeyid",
    "invalid_access_key",
    "signaturedoesnotmatch",
    "expiredtoken",
    "token has expired",
    "unable to locate credentials",
    "could not create a oauth2 access token",  # GCS without credentials
)
# How a store that cannot be reached reads (curl through pyarrow, google-cloud-cpp, botocore).
UNREACHABLE_WORDS = (
    "network_connection",
    "could not connect",
    "couldn't connect",
    "failed to connect",
    "connection refused",
    "could not resolve",
    "couldn't resolve",
    "timeout was reached",
    "timed out",
    "connect timeout",
    "status(unavailable",  # google-cloud-cpp, its retries spent
)
# A library's report of an OS error in words: safetensors (Rust) says "... (os error 28)".
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def os_error_of(err: BaseException) -> OSError | None:
    """The OS-level failure behind `err`: `err` itself when it is an OSError (pyarrow's local and
    store errors are), one a library names in its text (safetensors), else None."""
    if isinstance(err, OSError):
        return err
    if isinstance(err, (UserError, StorageError)):  # mapped already
        return None
    found = _OS_ERROR_IN_TEXT.search(str(err))
    if found:
        code = int(found[1])
        return OSError(code, os.strerror(code))
    return None


def is_persistent(err: BaseException) -> bool:
    """Whether a storage error will not go away by trying again."""
    if getattr(err, "errno", None) in PERSISTENT_ERRNOS:
        return True
    text = str(err).lower()
    return any(word in text for word in PERSISTENT_WORDS)


def is_unreachable(err: BaseException) -> bool:
    """Whether a storage error says the store could not be reached (refused, timed out, no
    such host), rather than answering."""
    text = str(err).lower()
    return any(word in text for word in UNREACHABLE_WORDS)


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


# A store client's message may run to kilobytes on one line (google-cloud-cpp's error_info).
_CAUSE_CHARS = 400


def storage_cause(err: BaseException) -> str:
    """The cause in a few words: "No space left on device (ENOSPC)", without "[Errno 28]"."""
    code = getattr(err, "errno", None)
    if code in errno.errorcode:
        text = getattr(err, "strerror", None) or first_line(err)
        return f"{text} ({errno.errorcode[code]})"
    text = first_line(err)
    return text if len(text) <= _CAUSE_CHARS else text[: _CAUSE_CHARS - 1].rstrip() + "…"


def storage_error(
    err: BaseException, operation: str, what: str, endpoint: str | None = None
) -> StorageError:
    """The one-line StorageError of a failed `operation` ("write", "read", ...) on `what` (a file
    and where it lives); a store that could not be reached is named by its `endpoint`."""
    cause = storage_cause(err)
    if endpoint and is_unreachable(err) and not is_persistent(err):
        cause = f"the store at {endpoint} cannot be reached ({cause})"
    return StorageError(f"cannot {operation} {what}: {cause}")


def missing_requirement(
    err: ModuleNotFoundError, where: str = "", python: str | None = None
) -> MissingRequirement | None:
    """The one-line error of a third-party module a Python lacks (None when the missing module is
    dtm_ray's own, which is a broken install or a bug): which module, which Python (this one,
    `sys.executable`, on `where` when given; or as `python` describes it) and what to install."""
    name = (err.name or "").split(".")[0]
    if not name or name == "dtm_ray":
        return None
    extra = _EXTRA_OF_MODULE.get(name)
    install = f'pip install "dtm-ray[{extra}]"' if extra else 'pip install "dtm-ray"'
    if python is None:
        python = f"the Python at {sys.executable or 'an unknown path'}"
        python += f" on {where}" if where else ""
    return MissingRequirement(
        f"{python} has no module {name!r} (a requirement of dtm-ray): install the requirements "
        f"into it ({install}, or the cluster image's requirements), or run dtm-ray with a Python "
        "that has them"
    )


# Modules of the optional extras (pyproject.toml); everything else is a base requirement.
_EXTRA_OF_MODULE = {
    "vllm": "vllm",
    "boto3": "s3",
    "botocore": "s3",
    "lm_eval": "eval",
    "moto": "dev",
    "pytest": "dev",
}
