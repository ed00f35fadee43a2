"""What holds engine actors up, in words: while they wait to be placed (the resources one actor
asks for, what the cluster offers, what other work holds) or load the model (what each says it
is doing). The start-up wait (`dtm_ray.cluster.startup`) and the pool's wait for a crashed
actor to come back (`dtm_ray.cluster.pool`) both report with these lines."""

from __future__ import annotations

from collections.abc import Sequence

import ray

from dtm_ray.cluster.actor import startup_report

# While actors wait to start or restart: the first report after this many seconds, then one
# every REPORT_S.
FIRST_REPORT_S = 3.0
REPORT_S = 15.0
# The hold-up when every actor is placed: it is loading the model (a restart: again).
LOADING = "loading the model"
RELOADING = "loading the model again"


def _amounts(resources: dict[str, float]) -> str:
    """Resources as a user reads them: memory in GiB, Ray's internal node labels left out."""
    shown = []
    for key in sorted(resources):
        if key.startswith(("node:", "accelerator_type:")) or key == "object_store_memory":
            continue
        value = resources[key]
        shown.append(f"{key} {value / 2**30:.1f} GiB" if key == "memory" else f"{key} {value:g}")
    return ", ".join(shown) or "nothing"


def _wanted(resources: dict[str, float]) -> tuple[dict[str, float], str]:
    """The resources one actor asks for (those > 0), and as the user reads them: {CPU: 1}."""
    wanted = {k: float(v) for k, v in resources.items() if v > 0}
    return wanted, "{" + ", ".join(f"{k}: {v:g}" for k, v in wanted.items()) + "}"


def start_holdup(resources: dict[str, float], count: int) -> str:
    """Why `count` actors asking for `resources` each have not all started yet, in words."""
    wanted, ask = _wanted(resources)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in wanted.items())]
    if not fits:
        offers = "; ".join(_amounts(n["Resources"]) for n in nodes) or "no node"
        missing = sorted(
            {k for k, v in wanted.items() if not any(n["Resources"].get(k, 0) >= v for n in nodes)}
        )
        return (
            f"each needs {ask} and no node has {', '.join(missing) or 'all of it at once'} "
            f"(the cluster offers: {offers}); an autoscaler may still add a node"
        )
    free = ray.available_resources()
    total = ray.cluster_resources()
    # What is in use beyond what these actors hold themselves once placed (they hold their
    # resources while they load the model) is held by other work.
    others = any(total.get(k, 0) - free.get(k, 0) > count * v + 1e-9 for k, v in wanted.items())
    if others and not all(free.get(k, 0) >= v for k, v in wanted.items()):
        return f"each needs {ask}, now in use by other work (free: {_amounts(free)})"
    return LOADING


def said_by(indexes: Sequence[int]) -> str:
    """What the starting actors `indexes` last said ("engine-0 on node-a: fetching …"); empty
    when none said anything yet."""
    said = {i: startup_report(i) for i in indexes}
    if not any(said.values()):
        return ""
    return "; ".join(text or f"engine-{i}: starting" for i, text in said.items())


def restart_holdup(resources: dict[str, float]) -> str:
    """Why a crashed actor asking for `resources` is not back yet, in words."""
    wanted, ask = _wanted(resources)
    free = ray.available_resources()
    if all(free.get(k, 0) >= v for k, v in wanted.items()):
        return RELOADING
    return (
        f"it needs {ask} and no node has that free (free: {_amounts(free)}); it waits for room "
        "on a node (an autoscaler may add one)"
    )
