"""Components: the linear weight matrices a probe compresses, named by their HF checkpoint names.

One table per architecture family maps (layer, kind) to the checkpoint name and the matrix shape
(out_features, in_features), derived from the model's config.json alone, so a job can be checked
and estimated without loading any weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("q", "k", "v", "o", "gate", "up", "down")

# Every supported architecture uses the Llama naming of its linear weights.
_LLAMA_NAMES = {
    "q": "model.layers.{layer}.self_attn.q_proj.weight",
    "k": "model.layers.{layer}.self_attn.k_proj.weight",
    "v": "model.layers.{layer}.self_attn.v_proj.weight",
    "o": "model.layers.{layer}.self_attn.o_proj.weight",
    "gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "up": "model.layers.{layer}.mlp.up_proj.weight",
    "down": "model.layers.{layer}.mlp.down_proj.weight",
}

ARCHITECTURES = {
    "LlamaForCausalLM": _LLAMA_NAMES,  # Llama 2/3, SmolLM/SmolLM2
    "MistralForCausalLM": _LLAMA_NAMES,
    "Qwen2ForCausalLM": _LLAMA_NAMES,
}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Component:
    name: str
    layer: int
    kind: str
    shape: tuple[int, int]  # (out_features, in_features), as stored in the checkpoint

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def kind_of(name: str) -> str:
    """The kind of a component from its weight name: `model.layers.3.self_attn.q_proj.weight`
    -> "q" (every supported architecture uses the Llama naming)."""
    return name.removesuffix(".weight").rpartition(".")[2].removesuffix("_proj")


def _shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "q": (heads * head_dim, hidden),
        "k": (kv_heads * head_dim, hidden),
        "v": (kv_heads * head_dim, hidden),
        "o": (hidden, heads * head_dim),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }


def architecture_of(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise UnsupportedArchitecture(
        f"unsupported architecture {archs or '(none given in config.json)'}; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def components_from_config(config: Mapping[str, Any]) -> list[Component]:
    """All probe-able components of a model, in layer-major, kind order."""
    names = ARCHITECTURES[architecture_of(config)]
    shapes = _shapes(config)
    return [
        Component(names[kind].format(layer=layer), layer, kind, shapes[kind])
        for layer in range(config["num_hidden_layers"])
        for kind in KINDS
    ]


def _matches(component: Component, selector: str | Mapping[str, Any]) -> bool:
    if isinstance(selector, Mapping):
        kinds = selector.get("kinds")
        layers = selector.get("layers")
        return (kinds is None or component.kind in kinds) and (
            layers is None or component.layer in layers
        )
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], component.name) is not None
    return component.name == selector


def check_selector(selector: Any) -> None:
    """Raise ValueError naming what is wrong with one selector."""
    if isinstance(selector, str):
        if selector.startswith("re:"):
            try:
                re.compile(selector[3:])
            except re.error as err:
                raise ValueError(f"bad regex in selector {selector!r}: {err}") from None
        return
    if not isinstance(selector, Mapping):
        raise ValueError(
            f"selector {selector!r} must be a weight name, 're:<regex>' or "
            "{kinds: [...], layers: [...]}"
        )
    unknown = set(selector) - {"kinds", "layers"}
    if unknown:
        raise ValueError(
            f"selector keys {sorted(unknown)} unknown; expected 'kinds' and/or 'layers'"
        )
    bad_kinds = [k for k in selector.get("kinds") or [] if k not in KINDS]
    if bad_kinds:
        raise ValueError(f"unknown kinds {bad_kinds} in selector; expected some of {list(KINDS)}")
    layers = selector.get("layers")
    if layers is not None and not all(isinstance(x, int) and x >= 0 for x in layers):
        raise ValueError(f"selector layers {layers!r} must be a list of layer indices (ints >= 0)")


def select(
    components: list[Component], selectors: str | Iterable[str | Mapping[str, Any]]
) -> list[Component]:
    """Components matching any selector, in model order. Each selector must match something.

    A selector is "all", an exact HF weight name, "re:<regex>" (full match, as llm-compressor
    recipes write it), or a mapping {kinds: [q, down], layers: [0, 1, 2]}.
    """
    if selectors == "all":
        return list(components)
    if isinstance(selectors, (str, Mapping)):
        selectors = [selectors]
    chosen: set[str] = set()
    for selector in selectors:
        check_selector(selector)
        hits = [c.name for c in components if _matches(c, selector)]
        if not hits:
            raise ValueError(f"selector {selector!r} matches no component of this model")
        chosen.update(hits)
    return [c for c in components if c.name in chosen]
