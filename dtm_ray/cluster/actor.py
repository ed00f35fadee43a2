"""The Ray engine actor: one loaded model serving many calls. It only forwards to its session.

Create actors with `start_engine_actors`. Fault tolerance: actors are created with
`max_restarts=-1` and a bounded `max_task_retries`, so when an actor's process dies Ray restarts
it (the constructor loads the model again) and re-runs its queued calls; the probe fan-out counts
crashes per probe itself (`dtm_ray.cluster.pool`). Every call carries what it needs
(the round's `RoundContext`, or the state to score), so a fresh actor brings itself up to date
before it answers. When the session reports its weights unknown (`EngineBroken`), the actor kills
its own process: Ray then restarts it clean instead of letting it score a half-patched model.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dtm_ray.core.state import ModelState, Reference
from dtm_ray.engines import EngineConfig, make_engine, resolve_dtype
from dtm_ray.engines.config import FISHER_BATCH_SIZE
from dtm_ray.engines.probe import ProbeResult
from dtm_ray.engines.prompts import load_calibration, load_prompts
from dtm_ray.engines.sensitivity import SensitivityResult
from dtm_ray.engines.session import EngineBroken, EngineSession
from dtm_ray.engines.sources import ModelSource, node_folder
from dtm_ray.errors import missing_requirement


@dataclass(frozen=True)
class RoundContext:
    """Everything an actor needs to score probes of one round; shipped once via the object store.

    `stats` are the round's calibration input norms (wanda), so every actor compresses a probe
    with the same statistics the decision will commit.
    """

    round: int
    state: ModelState
    reference: Reference
    stats: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Scored:
    result: ProbeResult
    worker: str


class EngineActor:
    # Whether the engine is loaded for dtm_ray's weight edits (False: as its engine serves it,
    # for actors that only generate and score; see `make_engine`).
    EDITS = True

    def __init__(
        self,
        model: ModelSource | str,
        engine_config: EngineConfig,
        index: int = 0,
        threads: int | None = None,
    ) -> None:
        try:
            self._start(model, engine_config, index, threads)
        except ModuleNotFoundError as err:  # this node's Python lacks a requirement: say which
            missing = missing_requirement(err, f"node {socket.gethostname()}")
            if missing is None:
                raise
            raise missing from None

    def _start(
        self, model: ModelSource | str, engine_config: EngineConfig, index: int, threads: int | None
    ) -> None:
        if threads:
            # Ray workers may inherit a thread count sized for the whole node; several engines
            # on one CPU box each spinning that many threads thrash (measured ~50x for vLLM).
            import torch

            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        _quiet_transformers()
        # This node's copy of the model: fetched by the first actor of the node, read by all.
        report = StartupReport(index)
        self.model_dir = node_folder(model, report)
        self.fetched = report.said
        report("loading the model")
        self.engine_kind = engine_config.kind
        self.dtype = resolve_dtype(engine_config.dtype)  # what `auto` means on this actor's device
        self.session = EngineSession(
            make_engine(self.model_dir, engine_config, edits=self.EDITS),
            engine_config.state_cache_bytes,
            engine_config.state_push_bytes,
        )
        self.worker = f"engine-{index}@{socket.gethostname()}:{os.getpid()}"

    def _guarded(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except EngineBroken as err:
            print(f"dtm-ray: {self.worker}: {err}; restarting this actor", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)  # a crash, not a clean exit, so that Ray restarts the actor

    # --- remote methods ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Who this actor is and what it runs on, recorded in run.json and checked on resume."""
        import platform

        import ray
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        hardware = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpus": gpus}
        return {
            "worker": self.worker,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),
            "engine": self.engine_kind,
            "dtype": self.dtype,
            "hardware": hardware,
            "model_fetched": self.fetched,  # this actor fetched the model for its node
            # VLLM_BATCH_INVARIANT as this actor's engine runs (the hf engine has no such mode).
            "batch_invariant": bool(getattr(self.session.engine, "batch_invariant", False)),
        }

    def load_prompts(self, source: str, count: int, prefix_tokens: int, seed: int) -> np.ndarray:
        return load_prompts(source, self.model_dir, count, prefix_tokens, self.session.engine, seed)

    def load_calibration(
        self,
        source: str,
        count: int,
        length: int,
        scored: tuple[int | Mapping[str, int], int],
        seed: int,
    ) -> np.ndarray:
        """Calibration sequences disjoint from the scored prompts, `scored` = (count per role,
        or the decide count alone; prefix tokens)."""
        engine = self.session.engine
        return load_calibration(source, self.model_dir, count, length, *scored, engine, seed)

    def build_reference(self, prefixes: np.ndarray, state: ModelState, n_new: int) -> Reference:
        self._guarded(self.session.apply_state, state)
        return self.session.build_reference(prefixes, n_new)

    def score(self, state: ModelState, reference: Reference) -> ProbeResult:
        self._guarded(self.session.apply_state, state)
        return self.session.score(reference)

    def input_norms(
        self, state: ModelState, sequences: np.ndarray, names: list[str]
    ) -> dict[str, np.ndarray]:
        self._guarded(self.session.apply_state, state)
        return self.session.input_norms(sequences, names)

    def text_nll(self, state: ModelState, windows: np.ndarray) -> np.ndarray:
        self._guarded(self.session.apply_state, state)
        return self.session.text_nll(windows)

    def zero_shares(self, state: ModelState, names: list[str]) -> dict[str, tuple[float, int]]:
        self._guarded(self.session.apply_state, state)
        return self.session.zero_shares(names)

    def null_probe(self, context: RoundContext) -> dict[str, Any]:
        """The round's model, unmodified (a probe with no compression), scored against the
        round's reference on this actor: what this actor's numerics alone make of it (its noise
        floor). One scoring pass over the P prompts x (prefix + N) tokens, like one probe; on
        the hf engine it also keeps the residual stream the round's first probe here would
        otherwise pay a pass for."""
        self._guarded(self.session.apply_state, context.state)
        result = self.session.score(context.reference)
        info = self.info()
        who = ("worker", "host", "node", "engine", "dtype", "batch_invariant")
        return {
            **{k: info[k] for k in who},
            "fdt": result.fdt,
            "sdt": result.sdt,
            "seconds": result.seconds,
        }

    def sensitivity(
        self,
        state: ModelState,
        guide: str,
        candidates: Mapping[str, list[str]],
        sequences: np.ndarray | None = None,
        stats: Mapping[str, np.ndarray] | None = None,
        batch_size: int = FISHER_BATCH_SIZE,
    ) -> SensitivityResult:
        """The sensitivity signal `guide` (fisher | weight_error) of every (component, spec) of
        `candidates` on `state`, on this actor's engine (see `EngineSession.sensitivity`):
        `sequences` are fisher's calibration text, `stats` wanda's input norms. Rows, seconds,
        passes; the state is left as it is."""
        self._guarded(self.session.apply_state, state)
        result = self.session.sensitivity(guide, candidates, sequences, stats, batch_size)
        result.worker = self.worker
        return result

    def dtype_of(self, component: str) -> tuple[int, str]:
        """(bytes per value, dtype name) of the weights as this engine holds them."""
        return self.session.itemsize(component), self.session.dtype_name(component)

    def probe(self, delta: Mapping[str, str], context: RoundContext) -> Scored:
        """Score the round's state plus `delta` against the round's reference.

        Nothing of the round is cached here: the state is applied (a no-op when the session
        holds it already, whatever other calls did in between) and the reference and
        statistics come with the call, so a changed reference can never be missed.
        """
        self._guarded(self.session.apply_state, context.state)
        result = self._guarded(self.session.probe, delta, context.reference, context.stats)
        return Scored(result, self.worker)


# --- what a starting actor is doing -----------------------------------------------------------
# An actor cannot answer calls until its constructor returns, so while it fetches and loads the
# model it says what it is doing in Ray's key-value store, where the driver's wait reads it.
_STARTUP_NAMESPACE = "dtm_ray_startup"


def _startup_key(index: int, job_id: str) -> str:
    return f"{job_id}:{index}"


class StartupReport:
    """The start-up progress of engine actor `index` (a Progress callback of `node_folder`)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.said = False  # whether this actor fetched the model for its node
        self.node = socket.gethostname()

    def __call__(self, text: str) -> None:
        self.said = self.said or text.startswith("fetching")
        try:
            import ray
            from ray.experimental import internal_kv

            key = _startup_key(self.index, ray.get_runtime_context().get_job_id())
            line = f"engine-{self.index} on {self.node}: {text}"
            internal_kv._internal_kv_put(key, line, namespace=_STARTUP_NAMESPACE)
        except Exception:  # noqa: BLE001 - outside Ray (tests, a plain process): nobody to tell
            pass


def startup_report(index: int) -> str | None:
    """The last thing starting actor `index` of this driver's job said (None: nothing yet)."""
    import ray
    from ray.experimental import internal_kv

    key = _startup_key(index, ray.get_runtime_context().get_job_id())
    value = internal_kv._internal_kv_get(key, namespace=_STARTUP_NAMESPACE)
    return value.decode() if value else None


def clear_startup_reports(index: int | None = None) -> None:
    """Forget what actor `index` (or every actor of this job) said while starting, once it
    answers: a later start begins with a clean slate."""
    import ray
    from ray.experimental import internal_kv

    key = _startup_key(0 if index is None else index, ray.get_runtime_context().get_job_id())
    if index is None:
        internal_kv._internal_kv_del(key[:-1], del_by_prefix=True, namespace=_STARTUP_NAMESPACE)
    else:
        internal_kv._internal_kv_del(key, namespace=_STARTUP_NAMESPACE)


def _quiet_transformers() -> None:
    # Load-time progress bars from every actor would be forwarded into the driver's output.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# --- creating actors -----------------------------------------------------------------------------
def cpu_threads(resources: Mapping[str, float]) -> int | None:
    """Threads for an engine on CPU: its CPU share (at least 1); None when it has a GPU."""
    if resources.get("GPU", 0) > 0:
        return None
    return max(1, int(resources.get("CPU", 1)))


# The driver's model-cache settings that its actors follow.
MODEL_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "DTM_RAY_CACHE")

# Calls other than the pool's fan-out are re-run by Ray when their actor restarts, this often.
CALL_RETRIES = 3


def engine_actor_options(
    resources: Mapping[str, float], call_retries: int = CALL_RETRIES
) -> dict[str, Any]:
    """`.options(...)` for an EngineActor holding `resources` ({GPU: 1}, {CPU: 1}, custom...).

    A dead actor is always restarted; a call it was running or held queued is re-run up to
    `call_retries` times (bounded: a call that kills its actor every time must end). The probe
    fan-out submits with no retries and counts crashes itself (`dtm_ray.cluster.pool`)."""
    custom = {k: float(v) for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    options: dict[str, Any] = {"max_restarts": -1, "max_task_retries": call_retries}
    if "memory" in resources:  # Ray's host memory resource, in bytes
        options["memory"] = resources["memory"]
    if "CPU" in resources:
        options["num_cpus"] = resources["CPU"]
    if "GPU" in resources:
        options["num_gpus"] = resources["GPU"]
    if custom:
        options["resources"] = custom
    # vLLM's per-engine INFO lines would be forwarded from every actor into the driver's output.
    env_vars = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    # Where the driver keeps models, when it says so, is where the nodes keep them too (a
    # cluster sets them on each node otherwise); tokens and credentials never travel this way.
    for name in MODEL_ENV:
        if name in os.environ:
            env_vars[name] = os.environ[name]
    threads = cpu_threads(resources)
    if threads:
        env_vars["OMP_NUM_THREADS"] = str(threads)
    options["runtime_env"] = {"env_vars": env_vars}
    return options


def start_engine_actors(
    model: ModelSource | str,
    engine_config: EngineConfig,
    count: int,
    resources: Mapping[str, float],
    actor_class: type | None = None,
    call_retries: int = CALL_RETRIES,
) -> list[Any]:
    """`count` actors of `actor_class` (EngineActor or a subclass), each holding `resources`;
    they load the model in the background."""
    import ray

    options = engine_actor_options(resources, call_retries)
    actor_class = ray.remote(actor_class or EngineActor).options(**options)
    threads = cpu_threads(resources)
    return [actor_class.remote(model, engine_config, i, threads) for i in range(count)]
