"""The one way dtm-ray speaks to the user while it works: a line on stderr, prefixed, flushed.

It sits below every layer so that the store, the lease and the Ray pool can report without
depending on the loop that streams results."""

from __future__ import annotations

import sys

from dtm_ray.redact import redact


def log(message: str) -> None:
    print(f"dtm-ray: {redact(message)}", file=sys.stderr, flush=True)
