"""What a round measures against and what it has done so far: pure data, numpy only, no torch.

- `Reference`: the prompts, the greedy continuation `y` of the model that built it, and that
  model's own teacher-forced argmax `a(F)` over `prefix ++ y`.
- `ModelState`: an optional base (weights that recovery training wrote to the run directory) and,
  per component, the ordered chain of compressions applied to its base weight (the base's tensor
  where the base holds one, else the model's original). Replaying a chain on that weight gives the
  current weight bit-identically anywhere (any actor, after a restart, on resume, at export),
  because every compression is a deterministic function of its input and the link's own
  calibration statistics, which travel with the link, and a base is a file that never changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Reference:
    prefixes: np.ndarray  # int64 [P, n]
    continuation: np.ndarray  # int64 [P, N]: y, the reference model's greedy tokens
    base_argmax: np.ndarray  # int64 [P, N]: a(F), its teacher-forced argmax over prefix ++ y
    base_margin: np.ndarray  # float32 [P, N]: top-1 minus top-2 log-probability of a(F)
    base_logprob: np.ndarray | None = None  # float32 [P, N]: log p(y_i) under the reference model

    @property
    def n_prefix(self) -> int:
        return self.prefixes.shape[1]

    @property
    def n_new(self) -> int:
        return self.continuation.shape[1]

    @property
    def prompts(self) -> int:
        return self.prefixes.shape[0]

    @property
    def sequences(self) -> np.ndarray:
        return np.concatenate([self.prefixes, self.continuation], axis=1)

    @property
    def noise_positions(self) -> np.ndarray:
        """Per prompt, positions where the base model's scoring disagrees with its own greedy."""
        return (self.base_argmax != self.continuation).sum(axis=1)

    @property
    def noise_floor(self) -> int:
        return int(self.noise_positions.sum())


def concat_references(parts: list[Reference]) -> Reference:
    """Parts in prompt order, joined into one reference."""

    def joined(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    return Reference(
        prefixes=np.concatenate([p.prefixes for p in parts]),
        continuation=np.concatenate([p.continuation for p in parts]),
        base_argmax=np.concatenate([p.base_argmax for p in parts]),
        base_margin=np.concatenate([p.base_margin for p in parts]),
        base_logprob=joined("base_logprob"),
    )


@dataclass(frozen=True)
class Link:
    """One compression in a component's chain.

    `stats_round` names the round whose calibration statistics a data-aware spec (wanda) used;
    `input_norm` carries those statistics so a replay needs nothing else. Links compare by spec
    and stats round, not by the array.
    """

    spec: str
    stats_round: int | None = None
    input_norm: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def stats(self) -> dict[str, np.ndarray] | None:
        return None if self.input_norm is None else {"input_norm": self.input_norm}


Chain = tuple[Link, ...]


def chain_key(chain: Chain) -> tuple[tuple[str, int | None], ...]:
    """Hashable identity of a chain: equal keys replay to the same weight."""
    return tuple((link.spec, link.stats_round) for link in chain)


@dataclass(frozen=True)
class ModelState:
    """component -> chain of links applied to its base weight; untouched components absent.

    `base` is the location (path or URI) of a base folder written by recovery training
    (`model.safetensors` with the trained tensors); None: every chain starts at the original."""

    chains: Mapping[str, Chain] = field(default_factory=dict)
    base: str | None = None

    def __post_init__(self) -> None:
        # Empty chains are the same as no entry; dropping them keeps keys and equality canonical.
        object.__setattr__(self, "chains", {name: tuple(c) for name, c in self.chains.items() if c})

    def chain(self, component: str) -> Chain:
        return self.chains.get(component, ())

    def specs(self, component: str) -> list[str]:
        return [link.spec for link in self.chain(component)]

    @property
    def key(self) -> tuple:
        """Hashable identity: equal keys mean the engines must hold the same weights."""
        chains = tuple((name, chain_key(chain)) for name, chain in sorted(self.chains.items()))
        return (self.base, chains)

    def extended(self, links: Mapping[str, Link]) -> ModelState:
        """A new state with one more link on each named component."""
        chains = dict(self.chains)
        for name, link in links.items():
            chains[name] = (*self.chain(name), link)
        return ModelState(chains, self.base)

    def components(self) -> Iterable[str]:
        return self.chains.keys()
