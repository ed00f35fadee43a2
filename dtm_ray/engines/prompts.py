"""Prompts, named by one source string, cut into fixed-length token prefixes.

Sources: a local `.txt` (one text per blank-line-separated paragraph), `.jsonl` (a `text` field per
line) or `.parquet` (a `text` column); `hf:<dataset>[:<config>]:<split>` for any `datasets` source
the machine can reach; `pydoc`: real English prose that ships with every CPython (the reference
documentation topics in `pydoc_data.topics`, about 460 KB), for machines with no hub or data;
`self`: data-free prefixes sampled from the model itself with a fixed seed (each engine has its
own sampler, so `self` prompts differ between engines); or `run:<run dir>`: the prefixes another
run probed (its round-0 reference), so two runs measure the very same prompts.

Every source but `self` is read, parsed and cut into prefixes on the driver before anything
starts (`prepare_prompts`), so a bad file is reported in one line naming what is wrong.

Calibration prompts (wanda's input norms) come from the same source but never overlap the scored
prompts: scoring on the very text a criterion was calibrated on would flatter it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:
    from dtm_ray.engines.base import Engine

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


NAMED_SOURCES = ("self", "pydoc")
# Calibration samples of a `self` source use seeds far from the scored prompts' seeds (each
# sampled prompt uses seed + its index), so the two sets never share a sampler seed.
_CALIBRATION_SEED_OFFSET = 1_000_003


RUN_PREFIX = "run:"
# How long the driver waits for the dataset hub to answer before calling an hf: source unreachable.
HUB_TIMEOUT_S = 3.0


def check_source(source: str, what: str = "prompt source", text_only: bool = False) -> None:
    """Fail early, before any model loads, on a source that cannot be read. `text_only`: the
    source must hold real text (`self` samples from the model; a run directory holds only
    token prefixes)."""
    if text_only and source == "self":
        raise ValueError(
            f"{what} 'self' is not real text (it samples from the model); expected 'pydoc', "
            f"'hf:<dataset>[:<config>]:<split>' or a file ending in {', '.join(TEXT_SUFFIXES)}"
        )
    if source in NAMED_SOURCES:
        return
    if source.startswith(RUN_PREFIX):
        if text_only:
            raise ValueError(f"{what} {source!r}: a run directory holds token prefixes, not text")
        if not source[len(RUN_PREFIX) :]:
            raise ValueError(f"{what} {source!r} must name a run directory, e.g. run:runs/first")
        if "://" in source:  # a run dir on a store: its URI's shape, before any client exists
            from dtm_ray.records.store import check_store_uri

            check_store_uri(source[len(RUN_PREFIX) :], f"{what} {RUN_PREFIX}")
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


def _hub_unreachable() -> str | None:
    """Why the dataset hub cannot be reached (None when it answers, or when the user asked for
    offline mode and so for the local cache)."""
    if any(os.environ.get(v, "").lower() in ("1", "true") for v in _OFFLINE_VARIABLES):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as err:
        return f"{host}:{port} cannot be reached ({err})"
    return None


_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _hf_texts(source: str) -> list[str]:
    parts = source.split(":")
    name, config, split = (parts[1], None, parts[2]) if len(parts) == 3 else parts[1:]
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"prompt source {source!r} needs the `datasets` package (pip install it)")
    # Without this check a machine with no hub access waits half a minute for retries.
    reason = _hub_unreachable()
    if reason is not None:
        raise ValueError(
            f"prompt source {source!r}: the dataset hub {reason}; use a local .txt/.jsonl/.parquet "
            "file or 'pydoc', or set HF_DATASETS_OFFLINE=1 to read a copy already in the cache"
        )
    import datasets

    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many kinds; each means "this source is unusable"
        raise ValueError(f"prompt source {source!r} cannot be loaded: {err}") from None
    if "text" not in data.column_names:
        raise ValueError(
            f"prompt source {source!r} has no 'text' column (columns: {data.column_names})"
        )
    return [str(t) for t in data["text"] if t is not None]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt file {path} line {number} is not valid JSON: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"prompt file {path} line {number} has no string 'text' field (found {found}); "
                'each line must be an object like {"text": "..."}'
            )
        texts.append(record["text"])
    return texts


def _parquet_texts(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if "text" not in names:
            raise ValueError(f"prompt file {path} has no 'text' column (columns: {names})")
        column = pq.read_table(path, columns=["text"]).column("text")
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"prompt file {path} is not a readable Parquet file: {err}") from None
    return [str(t) for t in column.to_pylist() if t is not None]


def read_texts(source: str) -> list[str]:
    """The source's texts, empty ones dropped; raises ValueError naming what is wrong, including
    a source that holds no text at all."""
    check_source(source, text_only=True)
    if source == "pydoc":
        texts = _pydoc_texts()
    elif source.startswith("hf:"):
        texts = _hf_texts(source)
    else:
        path = Path(source)
        if path.suffix == ".txt":
            try:
                texts = [p.strip() for p in path.read_text().split("\n\n")]
            except UnicodeDecodeError as err:
                raise ValueError(f"prompt file {path} is not UTF-8 text: {err}") from None
        elif path.suffix == ".jsonl":
            texts = _jsonl_texts(path)
        else:
            texts = _parquet_texts(path)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"prompt source {source} holds no text")
    return texts


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
    """int64 [count, prefix_tokens] token prefixes from `source` (`self` needs `engine`).

    Raises ValueError naming the source and what is wrong with it."""
    if count < 1 or prefix_tokens < 1:
        raise ValueError(f"need count >= 1 and prefix_tokens >= 1, got {count}, {prefix_tokens}")
    if source.startswith(RUN_PREFIX):
        return run_prefixes(source[len(RUN_PREFIX) :], count, prefix_tokens)
    # Texts first: a broken file is reported before the tokenizer even loads.
    texts = None if source == "self" else read_texts(source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if texts is None:
        if engine is None:
            raise ValueError("prompt source 'self' samples from the model and needs an engine")
        return sample_prefixes(engine, _bos_id(tokenizer), prefix_tokens, count, seed)
    try:
        return cut_prefixes(_tokenize(tokenizer, texts), prefix_tokens, count, seed)
    except ValueError as err:
        raise ValueError(f"prompt source {source}: {err}") from None


def run_prefixes(run_dir: str, count: int, prefix_tokens: int) -> np.ndarray:
    """The first `count` prompts another run probed (its round-0 reference), cut to
    `prefix_tokens`: the way to measure two runs (two engines, two dtypes) on the same prompts."""
    from dtm_ray.records.store import RunStore

    store = RunStore(run_dir)
    source = f"{RUN_PREFIX}{run_dir}"
    if store.read_run_info() is None:
        raise ValueError(f"prompt source {source}: {store.location} is not a run directory")
    table = store.read_reference(0)
    if table is None:
        raise ValueError(f"prompt source {source}: the run has no round-0 reference yet")
    prefixes = np.asarray(table.column("prefix_ids").to_pylist(), dtype=np.int64)
    have_count, have_tokens = prefixes.shape
    if have_count < count or have_tokens < prefix_tokens:
        raise ValueError(
            f"prompt source {source} holds {have_count} prefixes of {have_tokens} tokens; "
            f"prompts.count ({count}) and prompts.prefix_tokens ({prefix_tokens}) "
            "must not exceed them"
        )
    return prefixes[:count, :prefix_tokens]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:  # noqa: ANN001
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _token_lists(tokenizer, source: str) -> list[list[int]]:  # noqa: ANN001
    return _tokenize(tokenizer, read_texts(source))


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

    if source.startswith(RUN_PREFIX):
        raise ValueError(
            f"calibration needs text, and prompt source {source} holds only token prefixes"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if source == "self":
        if engine is None:
            raise ValueError("prompt source 'self' samples from the model and needs an engine")
        bos = _bos_id(tokenizer)
        return sample_prefixes(engine, bos, length, count, seed + _CALIBRATION_SEED_OFFSET)
    try:
        return cut_calibration(
            _token_lists(tokenizer, source), length, count, seed, scored_prefix_tokens, scored_count
        )
    except ValueError as err:
        raise ValueError(f"prompt source {source}: {err}") from None


def _bos_id(tokenizer) -> int:  # noqa: ANN001
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


# --- recovery training text ----------------------------------------------------------------------
def _kgrams(rows: np.ndarray, k: int) -> set[bytes]:
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return {row[i : i + k].tobytes() for row in rows for i in range(rows.shape[1] - k + 1)}


def overlapping(windows: np.ndarray, others: np.ndarray, k: int) -> np.ndarray:
    """bool [W]: which rows of `windows` share a run of `k` consecutive tokens with a row of
    `others`."""
    k = min(k, others.shape[1], windows.shape[1])
    seen = _kgrams(others, k)
    rows = np.ascontiguousarray(windows, dtype=np.int64)
    return np.asarray(
        [any(row[i : i + k].tobytes() in seen for i in range(len(row) - k + 1)) for row in rows],
        dtype=bool,
    )


def load_training(
    source: str,
    model_dir: str | Path,
    length: int,
    avoid: list[tuple[str, int, int, int]],
) -> np.ndarray:
    """int64 [W, length]: every window of `length` tokens of `source` on a grid from each text's
    start, leaving out those that overlap the windows `load_prompts(s, count, tokens, seed)`
    picks, for each (s, count, tokens, seed) of `avoid` whose source is this one.

    Raises ValueError when the source is not text or gives no window."""
    if source == "self" or source.startswith(RUN_PREFIX):
        raise ValueError(f"training needs text, and {source!r} holds none")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = _token_lists(tokenizer, source)
    taken: list[Span] = []
    for other, count, other_tokens, seed in avoid:
        if other == source:
            taken += _choose(_spans(tokens, other_tokens), count, seed, "windows")
    free = [s for s in _spans(tokens, length) if not _overlaps(s, taken)]
    if not free:
        raise ValueError(
            f"text {source} gives no window of {length} tokens apart from the scored prompts "
            "and the evaluation text"
        )
    return np.asarray([tokens[t][a:b] for t, a, b in free], dtype=np.int64)
