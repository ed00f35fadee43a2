"""A loaded engine plus the model state it holds: the stateful part of an engine actor, Ray-free.

`EngineSession` keeps three promises, each tested without Ray:
- `apply_state(state)` makes the engine hold exactly `state` (bit-identical to the chains
  replayed on the state's base weights: a recovery base's tensors where it has them, else the
  originals, so any session anywhere holds the same weights); it is all or nothing: the new
  chains are checked before any weight is written, and a failed write puts the old state back.
- `probe(delta, ...)` compresses a set of components on top of the state, scores, and puts those
  components back as the state has them, whatever happened in between.
- When putting weights back fails, the engine's weights are unknown: `EngineBroken` is raised and
  the session must not be used again (the Ray actor exits so Ray restarts it clean).

A probe of components in decoder layers >= L scores from the state's residual stream at layer L
where the engine can (the hf engine's layer skip): the session knows which state and reference the
engine's kept stream belongs to, and that a probe's put-back leaves every other layer as it was.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from dtm_ray.core.compress import apply_links, replay, replay_links
from dtm_ray.core.sensitivity import FISHER, SIGNALS
from dtm_ray.core.specs import check_applicable, parse_spec
from dtm_ray.core.state import Chain, Link, ModelState, Reference, chain_key
from dtm_ray.engines.base import EditsInPlace, Engine, MeasuresSensitivity
from dtm_ray.engines.checkpoint import BaseWeights
from dtm_ray.engines.config import FISHER_BATCH_SIZE, STATE_CACHE_BYTES, STATE_PUSH_BYTES
from dtm_ray.engines.probe import ProbeResult, build_reference, score_against
from dtm_ray.engines.sensitivity import SensitivityResult


class EngineBroken(RuntimeError):
    """The engine's weights are in an unknown state; discard the process that holds it."""


class EngineSession:
    def __init__(
        self,
        engine: Engine,
        cache_bytes: int = STATE_CACHE_BYTES,
        push_bytes: int = STATE_PUSH_BYTES,
    ) -> None:
        self.engine = engine
        self.state = ModelState()
        self._cache_bytes = cache_bytes
        self._push_bytes = push_bytes
        self._current: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # Engines that compress the weights they hold (both engines here) get names and specs;
        # others get whole tensors computed here.
        self._in_place = isinstance(engine, EditsInPlace)
        self._bases: dict[str, BaseWeights] = {}  # the held state's base and the next one
        # (state key, reference digest) of the residual stream the engine keeps, if any.
        self._residuals: tuple | None = None

    # --- weights ----------------------------------------------------------------------------
    def _base(self, location: str | None) -> BaseWeights | None:
        if location is None:
            return None
        base = self._bases.get(location)
        if base is None:
            for other in [k for k in self._bases if k != self.state.base]:
                self._bases.pop(other).close()  # only the held base and the next one stay open
            base = self._bases[location] = BaseWeights(location)
        return base

    def in_base(self, location: str | None, component: str) -> bool:
        base = self._base(location)
        return base is not None and component in base

    def _at_origin(self, state: ModelState, component: str) -> bool:
        """True when `state` holds the component as the model's checkpoint has it."""
        return not state.chain(component) and not self.in_base(state.base, component)

    def base_weight(self, component: str, location: str | None) -> torch.Tensor:
        """The weight a chain of a state with base `location` starts from: the base's tensor
        where it has one, else the original."""
        base = self._base(location)
        original = self.engine.original_weight(component)
        if base is None or component not in base:
            return original
        return base.get(component).to(original.dtype)

    def replay(self, component: str, chain: Chain, base: str | None = None) -> torch.Tensor:
        """The weight `chain` makes of the component's base weight (that weight for no chain),
        computed on the engine's device where it has one (a GPU: what a restarted actor or a
        cache miss replays runs there, not on one CPU thread)."""
        original = self.base_weight(component, base)
        device = getattr(self.engine, "device", None)
        if device is not None and chain:
            original = original.to(device)
        return replay(original, chain)

    def current_weight(self, component: str) -> torch.Tensor:
        """The component as the current state has it (cached: replaying a chain costs a sort)."""
        chain = self.state.chain(component)
        if not chain:
            return self.base_weight(component, self.state.base)
        key = (component, self.state.base, chain_key(chain))
        weight = self._current.get(key)
        if weight is None:
            weight = self._remember(key, self.replay(component, chain, self.state.base))
        else:
            self._current.move_to_end(key)
        return weight

    def _remember(self, key: tuple, weight: torch.Tensor) -> torch.Tensor:
        self._current[key] = weight
        while len(self._current) > 1 and self._cached_bytes() > self._cache_bytes:
            self._current.popitem(last=False)
        return weight

    def _cached_bytes(self) -> int:
        return sum(t.nbytes for t in self._current.values())

    def _write(self, weights: Mapping[str, torch.Tensor], originals: Iterable[str]) -> None:
        originals = list(originals)
        if originals:
            self.engine.restore(originals)
        if weights:
            self.engine.set_weights(dict(weights))

    def _shape(self, component: str) -> tuple[int, ...]:
        shape = getattr(self.engine, "weight_shape", None)
        if shape is not None:
            return tuple(shape(component))
        return tuple(self.engine.original_weight(component).shape)

    def _check(self, state: ModelState, names: Iterable[str]) -> None:
        """Everything that can be wrong with `state`'s chains for `names` (a bad spec, missing
        or misshapen statistics), found before the engine is touched."""
        for name in names:
            shape = self._shape(name)
            for link in state.chain(name):
                check_applicable(link.spec, shape, has_stats=link.input_norm is not None)
                if link.input_norm is not None and link.input_norm.shape != (shape[1],):
                    raise ValueError(
                        f"'{link.spec}' on {name}: input_norm has shape {link.input_norm.shape}, "
                        f"expected ({shape[1]},)"
                    )

    def _reach(self, component: str, chain: Chain, base: str | None) -> torch.Tensor:
        """The component's weight under `chain` on `base`, from the weight the session holds
        when `chain` only adds links to it on the same base (only the new links run), else
        replayed from the base weight."""
        held_chain = self.state.chain(component)
        cached = self._current.get((component, base, chain_key(chain)))
        if cached is not None:
            return cached
        if base == self.state.base and _extends(chain, held_chain):
            held = self._current.get((component, base, chain_key(held_chain)))
            if held is not None:
                return apply_links(held, chain[len(held_chain) :])
        return self.replay(component, chain, base)

    def _reach_in_place(
        self, component: str, chain: Chain, held_chain: Chain | None, base: str | None
    ) -> None:
        """Have the engine turn the weight it holds under `held_chain` (on the same base; None:
        in doubt, or another base) into the one `chain` makes on `base`, where it lives: only the
        new links when `chain` extends the held one, else the base weight back (the original
        through the engine's own restore, a recovery base's tensor written as one weight) and
        the chain replayed on it. No weight computed here."""
        if held_chain and _extends(chain, held_chain):
            self.engine.compress_in_place({component: chain[len(held_chain) :]})
            return
        if held_chain != ():  # the engine does not hold the base weight: put it back first
            if self.in_base(base, component):
                self.engine.set_weights({component: self.base_weight(component, base)})
            else:
                self.engine.restore([component])
        if chain:
            self.engine.compress_in_place({component: replay_links(chain)})

    def _push(self, state: ModelState, names: list[str], reach: Callable) -> None:
        """Write `names` as `state` has them, in batches of at most `push_bytes` of new weights
        (plus one weight), so memory during a state change is bounded by the budget, not by the
        model. `reach` returns None for a weight the engine reached in place."""
        batch: dict[str, torch.Tensor] = {}
        size = 0
        for name in names:
            if self._at_origin(state, name):
                continue
            weight = reach(name, state.chain(name))
            if weight is None:
                continue
            batch[name] = weight
            size += weight.nbytes
            if size >= self._push_bytes:
                self._write(batch, [])
                batch, size = {}, 0
        self._write(batch, [name for name in names if self._at_origin(state, name)])

    def apply_state(self, state: ModelState) -> None:
        """Make the engine hold exactly `state`; unlisted components are original.

        Only components whose chain changed are written; a chain that extends the held one runs
        just its new links on the held weight, so a state change costs the same in round 30 as
        in round 1. All or nothing: the new chains are checked first, and a failed write puts
        everything back as the old state has it."""
        if state.key == self.state.key:
            return
        names = set(self.state.components()) | set(state.components())
        new_base = state.base != self.state.base
        if new_base:  # every tensor of either base changes with the base
            for location in (self.state.base, state.base):
                base = self._base(location)
                names |= set(base.names) if base is not None else set()
        changed = [
            name
            for name in sorted(names)
            if chain_key(state.chain(name)) != chain_key(self.state.chain(name))
            or (new_base and any(self.in_base(s.base, name) for s in (state, self.state)))
        ]
        self._check(state, changed)
        self._residuals = None

        def reach(name: str, chain: Chain) -> torch.Tensor | None:
            if self._in_place:
                held = None if new_base else self.state.chain(name)
                self._reach_in_place(name, chain, held, state.base)
                return None
            weight = self._reach(name, chain, state.base)
            if chain:  # the first probe of the component needs no replay
                self._remember((name, state.base, chain_key(chain)), weight)
            return weight

        try:
            self._push(state, changed, reach)
        except BaseException as err:
            self._put_back(changed, f"a failed state change ({err!r})")
            raise
        self.state = state

    def _put_back(self, names: list[str], after: str) -> None:
        """Write `names` back as `self.state` has them (replayed, never read from the engine,
        whose weights are in doubt); when that fails the engine's weights are unknown and the
        session must not be used again."""

        def reach(name: str, chain: Chain) -> torch.Tensor | None:
            if self._in_place:  # from the base weight: the held weight is in doubt
                self._reach_in_place(name, chain, None, self.state.base)
                return None
            return self.current_weight(name)

        try:
            self._push(self.state, names, reach)
        except BaseException as err:
            raise EngineBroken(f"could not put {names} back after {after}: {err!r}") from err

    # --- probing ----------------------------------------------------------------------------
    def compressed(
        self, delta: Mapping[str, str], stats: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """The delta's new weights, computed here: each spec applied to the component's current
        weight."""
        return {
            name: apply_links(self.current_weight(name), (link,))
            for name, link in _probe_links(delta, stats).items()
        }

    def probe(
        self,
        delta: Mapping[str, str],
        reference: Reference,
        stats: Mapping[str, np.ndarray] | None = None,
    ) -> ProbeResult:
        """Score the state plus `delta` (component -> spec applied to its current weight).

        Where the engine compresses the weights it holds (both engines here), the probe sends it
        only the specs and statistics: it compresses in place, on its device (every vLLM worker
        rank its own shard), keeps a copy of what it overwrote and puts that back afterwards; no
        weight crosses a process boundary and nothing is replayed. Elsewhere the current weight
        comes from the session's cache or a replay."""
        start = time.perf_counter()
        links = _probe_links(delta, stats)
        for name, link in links.items():  # a bad spec fails before the engine is touched
            check_applicable(link.spec, self._shape(name), has_stats=link.input_norm is not None)
        from_layer = self._first_layer(delta, reference)
        names = list(delta)
        weights = None if self._in_place else self.compressed(delta, stats)
        try:
            if self._in_place:
                self.engine.compress_in_place({n: (link,) for n, link in links.items()}, keep=True)
            else:
                self.engine.set_weights(weights)
            result = score_against(self.engine, reference, from_layer)
        finally:
            self._restore_after_probe(names)
        result.seconds = time.perf_counter() - start
        return result

    def _restore_after_probe(self, names: list[str]) -> None:
        """Put the probed components back: from the engine's own copies where it kept them,
        else as the state has them (through the engine's restore for original components, from
        the cache or a replay for the others)."""
        if not self._in_place:
            self._put_back(names, "a probe")
            return
        try:
            self.engine.put_back(names)
        except BaseException as err:
            self._put_back(names, f"a failed put-back after a probe ({err!r})")

    def _first_layer(self, delta: Mapping[str, str], reference: Reference) -> int:
        """The decoder layer a probe's scoring pass can start at: the lowest layer the delta
        touches, once the engine keeps the state's residual stream for `reference`; 0 (a full
        pass) where the engine cannot skip layers or the delta touches layer 0 or no layer."""
        layer_of = getattr(self.engine, "layer_of", None)
        layers = [layer_of(name) for name in delta] if layer_of else [None]
        if not layers or None in layers or min(layers) == 0:
            return 0
        if self._residuals != self._residual_key(reference):
            self._score_keeping(reference)
        return min(layers)

    def _residual_key(self, reference: Reference) -> tuple:
        return (self.state.key, hashlib.sha1(reference.sequences.tobytes()).hexdigest())

    def _score_keeping(self, reference: Reference) -> ProbeResult:
        """Score the state as it is, keeping its residual stream for later probes."""
        self._residuals = None
        result = score_against(self.engine, reference, keep_residuals=True)
        self._residuals = self._residual_key(reference)
        return result

    # --- sensitivity signals (the anchors' guides) -----------------------------------------
    def sensitivity(
        self,
        guide: str,
        candidates: Mapping[str, Iterable[str]],
        sequences: np.ndarray | None = None,
        stats: Mapping[str, np.ndarray] | None = None,
        batch_size: int = FISHER_BATCH_SIZE,
    ) -> SensitivityResult:
        """The sensitivity signal `guide` (fisher | weight_error; definitions in
        `dtm_ray.core.sensitivity`) of every (component, spec) of `candidates` on the state the
        engine holds: each spec applied to the component's current weight as a probe applies it
        (absolute sparsities, e.g. `absolute_sparsity(s0, a)` for added sparsity a; wanda specs
        take the component's input norms from `stats`). `sequences` [S, T] are the calibration
        text fisher needs (ignored by weight_error). Measured where the weights live; no weight
        is written, so the state is untouched. Rows in the order of the candidates."""
        if guide not in SIGNALS:
            raise ValueError(f"unknown sensitivity guide {guide!r}; expected one of {SIGNALS}")
        if not isinstance(self.engine, MeasuresSensitivity):
            raise TypeError(f"{type(self.engine).__name__} measures no sensitivity signals")
        start = time.perf_counter()
        links = {
            name: [_link(name, spec, stats) for spec in dict.fromkeys(map(_canonical, specs))]
            for name, specs in candidates.items()
        }
        for name, chain in links.items():  # a bad spec fails before the engine is asked
            shape = self._shape(name)
            for link in chain:
                check_applicable(link.spec, shape, has_stats=link.input_norm is not None)
        if guide == FISHER:
            if sequences is None or len(sequences) == 0:
                raise ValueError("the fisher guide needs calibration sequences")
            calibration = np.asarray(sequences).tolist()
            values = self.engine.fisher_scores(calibration, links, batch_size)
        else:
            values = self.engine.weight_errors(links)
        rows = [
            {"component": name, "spec": link.spec, **values.values[(name, link.spec)]}
            for name, chain in links.items()
            for link in chain
        ]
        seconds = time.perf_counter() - start
        return SensitivityResult(guide, rows, seconds, values.passes, values.tokens)

    # --- what a round needs besides probes ----------------------------------------------
    def build_reference(self, prefixes: np.ndarray, n_new: int) -> Reference:
        return build_reference(self.engine, prefixes, n_new)

    def score(self, reference: Reference) -> ProbeResult:
        """The current state measured against `reference` (e.g. the dense model's)."""
        if hasattr(self.engine, "layer_of"):
            return self._score_keeping(reference)
        return score_against(self.engine, reference)

    def input_norms(self, sequences: np.ndarray, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Wanda's calibration statistics of the current state: ‖x_j‖₂ per input feature."""
        norms = self.engine.input_norms(np.asarray(sequences).tolist(), list(names))
        return {name: norm.float().numpy() for name, norm in norms.items()}

    def text_nll(self, windows: np.ndarray) -> np.ndarray:
        """Per-token negative log-likelihood of real-text windows [W, T] -> float64 [W, T-1]."""
        scored = self.engine.score(np.asarray(windows).tolist(), 1)
        return -np.asarray(scored.ref_logprob, dtype=np.float64)

    def itemsize(self, component: str) -> int:
        """Bytes per value of the engine's weights (the model's dtype as loaded)."""
        return self.engine.original_weight(component).element_size()

    def dtype_name(self, component: str) -> str:
        return str(self.engine.original_weight(component).dtype).removeprefix("torch.")

    def zero_shares(self, names: Iterable[str]) -> dict[str, tuple[float, int]]:
        """Per component: (share of zeros, count of nonzeros) of its current weight, counted
        where the engine holds it when it can (no replay, no weight copied out)."""
        names = list(names)
        if self._in_place:
            counts = self.engine.nonzero_counts(names)
        else:
            counts = {name: int(torch.count_nonzero(self.current_weight(name))) for name in names}
        out = {}
        for name in names:
            numel = int(np.prod(self._shape(name)))
            out[name] = (1.0 - counts[name] / numel, counts[name])
        return out


def _extends(chain: Chain, held: Chain) -> bool:
    """Whether `chain` is `held` plus links after it."""
    return chain_key(chain[: len(held)]) == chain_key(held)


def _canonical(spec: str) -> str:
    return str(parse_spec(spec))


def _link(name: str, spec: str, stats: Mapping[str, np.ndarray] | None) -> Link:
    """One spec on component `name` as a link, with its input norms where the spec needs them;
    a missing statistic is an error before anything runs."""
    norm = (stats or {}).get(name) if parse_spec(spec).needs_stats else None
    if parse_spec(spec).needs_stats and norm is None:
        raise ValueError(f"'{spec}' on {name} needs calibration input norms; none given")
    return Link(spec, None, norm)


def _probe_links(delta: Mapping[str, str], stats: Mapping[str, np.ndarray] | None) -> dict:
    """A probe's delta as one link per component (see `_link`)."""
    return {name: _link(name, spec, stats) for name, spec in delta.items()}
