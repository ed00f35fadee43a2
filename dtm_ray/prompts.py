"""Prompts, named by one source string, cut into fixed-length token prefixes.

Sources: a local `.txt` (one text per blank-line-separated paragraph), `.jsonl` (a `text` field per
line) or `.parquet` (a `text` column); `hf:<dataset>[:<config>]:<split>` for any `datasets` source
the machine can reach; `pydoc`: real English prose that ships with every CPython (the reference
documentation topics in `pydoc_data.topics`, about 460 KB), for machines with no hub or data;
or `self`: data-free prefixes sampled from the model itself with a fixed seed.

Calibration prompts (wanda's input norms) come from the same source but never overlap the scored
prompts: scoring on the very text a criterion was calibrated on would flatter it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dtm_ray.engines.base import Engine

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


NAMED_SOURCES = ("self", "pydoc")
# Calibration samples of a `self` source use seeds far from the scored prompts' seeds (each
# sampled prompt uses seed + its index), so the two sets never share a sampler seed.
_CALIBRATION_SEED_OFFSET = 1_000_003


def check_source(source: str, what: str = "prompt source") -> None:
    """Fail early, before any model loads, on a source that cannot be read."""
    if source in NAMED_SOURCES:
        return
    if source.startswith("hf:"):
        parts = source.split(":")
        if len(parts) not in (3, 4) or not all(parts[1:]):
            raise ValueError(
                f"{what} {source!r} must be hf:<dataset>[:<config>]:<split>, "
                "e.g. hf:wikitext:wikitext-2-raw-v1:test"
            )
        return
    path = Path(source)
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(
            f"{what} {source!r} must be 'self', 'pydoc', 'hf:<dataset>[:<config>]:<split>' "
            f"or a file ending in {', '.join(TEXT_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {source} does not exist")


def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    # One text per topic, in a fixed (sorted) order so windows are reproducible.
    return [topics[name] for name in sorted(topics)]


def read_texts(source: str) -> list[str]:
    check_source(source)
    if source == "self":
        raise ValueError("prompt source 'self' has no texts; it samples from the model")
    if source == "pydoc":
        return _pydoc_texts()
    if source.startswith("hf:"):
        import datasets

        parts = source.split(":")
        name, config, split = (parts[1], None, parts[2]) if len(parts) == 3 else parts[1:]
        return list(datasets.load_dataset(name, config, split=split)["text"])
    path = Path(source)
    if path.suffix == ".txt":
        return [p.strip() for p in path.read_text().split("\n\n")]
    if path.suffix == ".jsonl":
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return [json.loads(ln)["text"] for ln in lines]
    import pyarrow.parquet as pq

    return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]


Span = tuple[int, int, int]  # (text index, first token, one past the last token)


def _spans(token_lists: list[list[int]], length: int) -> list[Span]:
    """Every non-overlapping window of `length` tokens, on a grid from each text's start."""
    return [
        (t, start, start + length)
        for t, tokens in enumerate(token_lists)
        for start in range(0, len(tokens) - length + 1, length)
    ]


def _choose(spans: list[Span], count: int, seed: int, what: str) -> list[Span]:
    if len(spans) < count:
        raise ValueError(f"the texts give only {len(spans)} {what}; {count} are needed")
    chosen = np.sort(np.random.default_rng(seed).choice(len(spans), size=count, replace=False))
    return [spans[i] for i in chosen]


def _overlaps(span: Span, others: list[Span]) -> bool:
    return any(span[0] == o[0] and span[1] < o[2] and o[1] < span[2] for o in others)


def cut_prefixes(
    token_lists: list[list[int]], prefix_tokens: int, count: int, seed: int
) -> np.ndarray:
    """`count` non-overlapping windows of `prefix_tokens` tokens, chosen with a fixed seed."""
    spans = _choose(
        _spans(token_lists, prefix_tokens),
        count,
        seed,
        f"prefixes of {prefix_tokens} tokens ({len(token_lists)} non-empty texts)",
    )
    return np.asarray([token_lists[t][a:b] for t, a, b in spans], dtype=np.int64)


def cut_calibration(
    token_lists: list[list[int]],
    length: int,
    count: int,
    seed: int,
    scored_prefix_tokens: int,
    scored_count: int,
) -> np.ndarray:
    """`count` windows of `length` tokens that overlap none of the scored prefixes, which are the
    ones `cut_prefixes(token_lists, scored_prefix_tokens, scored_count, seed)` picks."""
    scored = _choose(
        _spans(token_lists, scored_prefix_tokens), scored_count, seed, "scored prefixes"
    )
    free = [s for s in _spans(token_lists, length) if not _overlaps(s, scored)]
    spans = _choose(free, count, seed + 1, f"calibration windows of {length} tokens")
    return np.asarray([token_lists[t][a:b] for t, a, b in spans], dtype=np.int64)


def sample_prefixes(
    engine: Engine, bos_id: int, prefix_tokens: int, count: int, seed: int
) -> np.ndarray:
    """Data-free prompts: the model's own seeded samples after its BOS token."""
    starts = [[bos_id]] * count
    sampled = engine.sample(starts, prefix_tokens - 1, seed)
    return np.concatenate([np.full((count, 1), bos_id, dtype=np.int64), sampled], axis=1)


def load_prompts(
    source: str,
    model_dir: str | Path,
    count: int,
    prefix_tokens: int,
    engine: Engine | None = None,
    seed: int = 0,
) -> np.ndarray:
    """int64 [count, prefix_tokens] token prefixes from `source` (`self` needs `engine`)."""
    if count < 1 or prefix_tokens < 1:
        raise ValueError(f"need count >= 1 and prefix_tokens >= 1, got {count}, {prefix_tokens}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if source == "self":
        if engine is None:
            raise ValueError("prompt source 'self' samples from the model and needs an engine")
        return sample_prefixes(engine, _bos_id(tokenizer), prefix_tokens, count, seed)
    return cut_prefixes(_token_lists(tokenizer, source), prefix_tokens, count, seed)


def _token_lists(tokenizer, source: str) -> list[list[int]]:  # noqa: ANN001
    texts = [t for t in read_texts(source) if t and t.strip()]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def load_calibration(
    source: str,
    model_dir: str | Path,
    count: int,
    length: int,
    scored_count: int,
    scored_prefix_tokens: int,
    engine: Engine | None = None,
    seed: int = 0,
) -> np.ndarray:
    """int64 [count, length] calibration sequences from `source`, disjoint from the scored
    prompts that `load_prompts(source, ..., scored_count, scored_prefix_tokens, seed=seed)`
    gives."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if source == "self":
        if engine is None:
            raise ValueError("prompt source 'self' samples from the model and needs an engine")
        bos = _bos_id(tokenizer)
        return sample_prefixes(engine, bos, length, count, seed + _CALIBRATION_SEED_OFFSET)
    return cut_calibration(
        _token_lists(tokenizer, source), length, count, seed, scored_prefix_tokens, scored_count
    )


def _bos_id(tokenizer) -> int:  # noqa: ANN001
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
