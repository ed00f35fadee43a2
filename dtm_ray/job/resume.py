"""Resuming a run directory: which job keys must match the run's `run.json`, and the fingerprint
every probe row carries so rows of two jobs can never pass for one run."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from dtm_ray.errors import ConfigError

# Keys that change how a run executes but not what it measures; they may differ on resume.
OPERATIONAL_KEYS = frozenset(
    {
        "out",
        "workers",
        "resources_per_worker",
        "max_in_flight_per_worker",
        "max_probe_retries",
        "max_probe_crashes",
        "startup_timeout_s",
        "engine_options.gpu_memory_utilization",
        # Memory budgets buy speed, never a different result.
        "engine_options.residual_cache_bytes",
        "engine_options.residual_host_bytes",
        "engine_options.state_cache_bytes",
        "engine_options.state_push_bytes",
        "engine_options.original_cache_bytes",
        "engine_options.cpu_kv_cache_bytes",
        # Evaluating tasks reads a finished run; adding it to one must not make it unresumable.
        "evaluate",
    }
)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"prompts": {"count": 8}} -> {"prompts.count": 8}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in OPERATIONAL_KEYS:
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved job configs, operational ones aside."""
    # A JSON round trip makes tuples lists (and so on), as they are in a stored run.json.
    old = flatten_config(json.loads(json.dumps(stored)))
    new = flatten_config(json.loads(json.dumps(current)))
    # A key missing on one side counts as None: keys added to the config later (as None, "not
    # set") do not make older runs unresumable.
    return sorted(
        key
        for key in set(old) | set(new)
        if key not in OPERATIONAL_KEYS and old.get(key) != new.get(key)
    )


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short digest of what a run measures (operational keys aside); every probe row carries it,
    so rows of two different jobs can never pass for one run. Unset keys are left out, as a
    missing key counts as unset on resume."""
    flat = flatten_config(json.loads(json.dumps(config)))
    measured = {k: v for k, v in flat.items() if k not in OPERATIONAL_KEYS and v is not None}
    text = json.dumps(measured, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(stored: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError naming every differing key when a run dir is reused with another job."""
    keys = config_differences(stored, current)
    if not keys:
        return
    old = flatten_config(json.loads(json.dumps(stored)))
    new = flatten_config(json.loads(json.dumps(current)))
    missing = "<missing>"
    details = "; ".join(
        f"{k}: {old.get(k, missing)!r} in the run, {new.get(k, missing)!r} now" for k in keys
    )
    raise ConfigError(
        f"run dir {where} was started with a different job ({details}); "
        "resume with the original settings or choose another --out"
    )
