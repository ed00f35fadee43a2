"""Prompts, named by one source string, cut into fixed-length token prefixes.

Sources: a local `.txt` (one text per blank-line-separated paragraph), `.jsonl` (a `text` field per
line) or `.parquet` (a `text` column); `hf:<dataset>[:<config>]:<split>` for any `datasets` source
the machine can reach; or `self`: data-free prefixes sampled from the model itself with a fixed
seed, for machines with no data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dtm_ray.engines.base import Engine

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def check_source(source: str) -> None:
    """Fail early, before any model loads, on a source that cannot be read."""
    if source == "self":
        return
    if source.startswith("hf:"):
        parts = source.split(":")
        if len(parts) not in (3, 4) or not all(parts[1:]):
            raise ValueError(
                f"prompt source {source!r} must be hf:<dataset>[:<config>]:<split>, "
                "e.g. hf:wikitext:wikitext-2-raw-v1:test"
            )
        return
    path = Path(source)
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(
            f"prompt source {source!r} must be 'self', 'hf:<dataset>[:<config>]:<split>' "
            f"or a file ending in {', '.join(TEXT_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist")


def read_texts(source: str) -> list[str]:
    check_source(source)
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


def cut_prefixes(
    token_lists: list[list[int]], prefix_tokens: int, count: int, seed: int
) -> np.ndarray:
    """`count` non-overlapping windows of `prefix_tokens` tokens, chosen with a fixed seed."""
    windows = [
        tokens[start : start + prefix_tokens]
        for tokens in token_lists
        for start in range(0, len(tokens) - prefix_tokens + 1, prefix_tokens)
    ]
    if len(windows) < count:
        raise ValueError(
            f"the texts give only {len(windows)} prefixes of {prefix_tokens} tokens "
            f"({len(token_lists)} non-empty texts); {count} are needed"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(len(windows), size=count, replace=False))
    return np.asarray([windows[i] for i in chosen], dtype=np.int64)


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
        bos = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        return sample_prefixes(engine, bos, prefix_tokens, count, seed)
    texts = [t for t in read_texts(source) if t and t.strip()]
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return cut_prefixes(token_lists, prefix_tokens, count, seed)
