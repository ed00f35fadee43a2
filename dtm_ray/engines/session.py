"""A loaded engine plus the model state it holds: the stateful part of an engine actor, Ray-free.

`EngineSession` keeps three promises, each tested without Ray:
- `apply_state(state)` makes the engine hold exactly `state` (chains replayed on the state's
  base weights: a recovery base's tensors where it has them, else the originals, so any session
  anywhere holds bit-identical weights; a new base is pushed in the same bounded batches); it is
  all or nothing: the new weights are computed before any is written, and a failed write puts
  the old state back.
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

from dtm_ray.core.compress import apply_links, compress, replay
from dtm_ray.core.specs import check_applicable, parse_spec
from dtm_ray.core.state import Chain, ModelState, Reference, chain_key
from dtm_ray.engines.base import Engine
from dtm_ray.engines.checkpoint import BaseWeights
from dtm_ray.engines.config import STATE_CACHE_BYTES, STATE_PUSH_BYTES
from dtm_ray.engines.probe import ProbeResult, build_reference, score_against


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

    def _held(self, component: str) -> torch.Tensor | None:
        """A copy of the component as the engine holds it now, on the engine's device, where the
        engine can give one (the hf engine); None otherwise."""
        held = getattr(self.engine, "held_weight", None)
        return held(component) if held is not None else None

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
        when `chain` only adds links to it on the same base (only the new links run, on the
        engine's device), else replayed from the base weight."""
        held_chain = self.state.chain(component)
        cached = self._current.get((component, base, chain_key(chain)))
        if cached is not None:
            return cached
        same_base = base == self.state.base
        if same_base and held_chain and chain_key(chain[: len(held_chain)]) == chain_key(
            held_chain
        ):
            held = self._current.get((component, base, chain_key(held_chain)))
            if held is None:
                held = self._held(component)
            if held is not None:
                return apply_links(held, chain[len(held_chain) :])
        return self.replay(component, chain, base)

    def _push(self, state: ModelState, names: list[str], reach: Callable) -> None:
        """Write `names` as `state` has them, in batches of at most `push_bytes` of new weights
        (plus one weight), so memory during a state change is bounded by the budget, not by the
        model."""
        batch: dict[str, torch.Tensor] = {}
        size = 0
        for name in names:
            if self._at_origin(state, name):
                continue
            batch[name] = weight = reach(name, state.chain(name))
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
        keep = not hasattr(self.engine, "held_weight")  # else probes read the engine's own copy

        def reach(name: str, chain: Chain) -> torch.Tensor:
            weight = self._reach(name, chain, state.base)
            if keep and chain:  # the first probe of the component needs no replay
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
        try:
            self._push(self.state, names, lambda name, _chain: self.current_weight(name))
        except BaseException as err:
            raise EngineBroken(f"could not put {names} back after {after}: {err!r}") from err

    # --- probing ----------------------------------------------------------------------------
    def compressed(
        self,
        delta: Mapping[str, str],
        stats: Mapping[str, np.ndarray] | None = None,
        current: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The delta's new weights: each spec applied to the component's current weight (taken
        from `current` where given)."""
        weights = {}
        for name, spec in delta.items():
            needs = parse_spec(spec).needs_stats
            norm = (stats or {}).get(name) if needs else None
            if needs and norm is None:
                raise ValueError(f"'{spec}' on {name} needs calibration input norms; none given")
            link_stats = None if norm is None else {"input_norm": norm}
            weight = (current or {}).get(name)
            if weight is None:
                weight = self.current_weight(name)
            weights[name] = compress(weight, spec, link_stats)
        return weights

    def probe(
        self,
        delta: Mapping[str, str],
        reference: Reference,
        stats: Mapping[str, np.ndarray] | None = None,
    ) -> ProbeResult:
        """Score the state plus `delta` (component -> spec applied to its current weight).

        Where the engine gives a copy of what it holds (the hf engine, on its own device), the
        probe compresses that copy and puts it back from it afterwards: no replay, and no weight
        leaves the engine's device. Elsewhere the current weight comes from the session's cache
        or a replay."""
        start = time.perf_counter()
        saved = {name: self._held(name) for name in delta}
        saved = {name: weight for name, weight in saved.items() if weight is not None}
        weights = self.compressed(delta, stats, saved)
        from_layer = self._first_layer(delta, reference)
        try:
            self.engine.set_weights(weights)
            result = score_against(self.engine, reference, from_layer)
        finally:
            self._restore_after_probe(list(delta), saved)
        result.seconds = time.perf_counter() - start
        return result

    def _restore_after_probe(self, names: list[str], saved: Mapping[str, torch.Tensor]) -> None:
        """Put the probed components back: original ones through the engine's restore, others
        from the copies saved before the probe (or replayed when none was saved)."""
        if set(names) - set(saved):
            self._put_back(names, "a probe")
            return
        try:
            held = {n: saved[n] for n in names if not self._at_origin(self.state, n)}
            self._write(held, [n for n in names if self._at_origin(self.state, n)])
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

    # --- what a round needs besides probes ----------------------------------------------
    def build_reference(self, prefixes: np.ndarray, n_new: int) -> Reference:
        return build_reference(self.engine, prefixes, n_new)

    def score(self, reference: Reference) -> ProbeResult:
        """The current state measured against `reference` (e.g. the dense model's)."""
        if hasattr(self.engine, "layer_of"):
            return self._score_keeping(reference)
        return score_against(self.engine, reference)

    def input_norms(
        self, sequences: np.ndarray, names: Iterable[str]
    ) -> dict[str, np.ndarray]:
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
        """Per component: (share of zeros, count of nonzeros) of its current weight."""
        out = {}
        for name in names:
            weight = self.current_weight(name)
            nonzero = int(torch.count_nonzero(weight))
            out[name] = (1.0 - nonzero / weight.numel(), nonzero)
        return out
