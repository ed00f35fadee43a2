"""Secrets never reach a run directory, a log or the terminal.

Run directories get shared, so what dtm-ray writes (run.json, tables, logs, the report, the
export's metadata) and prints passes through `redact` first. It masks:
- the value of every environment variable whose name says it holds a secret (HF_TOKEN,
  AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, ..._PASSWORD, ..._API_KEY);
- the user and password of a URL (`https://user:pass@host`);
- secret-looking query parameters of a URI (`s3://b/run?secret_key=...&access_key=...`).

It sits below every layer so that each place that writes can use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# Environment variable names that hold secrets.
_SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE
)
# Shorter values ("1", "true", "disabled") are settings, not secrets, and would mask common words.
_MIN_SECRET_LENGTH = 8
# (pattern, replacement): RE2-compatible, so Arrow's vectorized kernels use them too.
PATTERNS = (
    (r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s?#]+@", r"\1" + MASK + "@"),  # user:password@
    (
        r"(?i)([?&;][A-Za-z0-9_.-]*?(?:token|secret|password|passwd|key|signature)=)"
        r"[^&\s#'\"]+",
        r"\1" + MASK,
    ),
)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of this process's secret environment variables, longest first."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret masked (see the module docstring)."""
    for value in secret_values():
        text = text.replace(value, MASK)
    for pattern, replacement in PATTERNS:
        text = re.sub(pattern, replacement, text)
    return text


def redact_data(data: Any) -> Any:
    """A JSON-like structure with every string in it redacted (keys stay as they are)."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, Mapping):
        return {key: redact_data(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_data(item) for item in data]
    return data
