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

Three roles draw prompts from one source (`cut_roles`, `load_roles`): `decide` (what rounds probe),
`validate` (what acceptance reads: the quantize search's checks, the sparsify floor) and `test`
(read only by the final evaluation). Windows lie on one grid per prefix length, so the decide
draw is exactly the one a job without the other roles makes; validate and test are drawn from the
grid windows left over, each with its own seed, so no window of one role overlaps another's. A
`self` source gives each role its own range of sampler seeds instead.

Calibration prompts (wanda's input norms) and recovery training text come from the same source
but never overlap any role's windows: scoring on the very text a criterion was calibrated or
trained on would flatter it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:
    from dtm_ray.engines.base import Engine

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


NAMED_SOURCES = ("self", "pydoc")
# Calibration samples of a `self` source use seeds far from the scored prompts' seeds (each
# sampled prompt uses seed + its index), so the two sets never share a sampler seed.
_CALIBRATION_SEED_OFFSET = 1_000_003

# The prompt roles, in draw order: decide first, so its windows are those a job without the other
# roles draws. Each role's seed is the job's seed plus its offset: for text sources the seed of
# its draw among the windows left, for `self` the first of its sampler seeds (a role of P prompts
# uses seed + offset .. seed + offset + P - 1; the offsets keep the roles, and calibration, apart
# for any P below a million).
ROLES = ("decide", "validate", "test")
ROLE_SEED_OFFSETS = {"decide": 0, "validate": 2_000_003, "test": 3_000_003}


def role_seed(seed: int, role: str) -> int:
    """The seed of `role`'s draw (or first sampler seed) for a job seeded with `seed`."""
    return seed + ROLE_SEED_OFFSETS[role]


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


def _describe(counts: Mapping[str, int]) -> str:
    """'16' for decide alone, else '16 decide + 16 validate + 64 test = 96'."""
    used = {role: n for role, n in counts.items() if n}
    if list(used) == ["decide"]:
        return str(used["decide"])
    parts = " + ".join(f"{n} {role}" for role, n in used.items())
    return f"{parts} = {sum(used.values())}"


def role_spans(
    token_lists: list[list[int]], prefix_tokens: int, counts: Mapping[str, int], seed: int
) -> dict[str, list[Span]]:
    """Per role of `counts` (decide, validate, test; a role of count 0 is left out), its windows
    of `prefix_tokens` tokens on the grid from each text's start. Decide is drawn exactly as a
    job with only decide prompts draws it; each later role from the grid windows no earlier
    role took, with its own seed (`role_seed`), so no two roles share a window."""
    spans = _spans(token_lists, prefix_tokens)
    wanted = {role: int(counts.get(role) or 0) for role in ROLES}
    what = f"prefixes of {prefix_tokens} tokens ({len(token_lists)} non-empty texts)"
    if len(spans) < sum(wanted.values()):
        raise ValueError(f"the texts give only {len(spans)} {what}; {_describe(wanted)} are needed")
    out: dict[str, list[Span]] = {}
    free = spans
    for role, count in wanted.items():
        if not count:
            continue
        out[role] = _choose(free, count, role_seed(seed, role), what)
        taken = set(out[role])
        free = [s for s in free if s not in taken]
    return out


def _windows(token_lists: list[list[int]], spans: list[Span]) -> np.ndarray:
    return np.asarray([token_lists[t][a:b] for t, a, b in spans], dtype=np.int64)


def cut_roles(
    token_lists: list[list[int]], prefix_tokens: int, counts: Mapping[str, int], seed: int
) -> dict[str, np.ndarray]:
    """Per role, int64 [count, prefix_tokens] windows (`role_spans`)."""
    spans = role_spans(token_lists, prefix_tokens, counts, seed)
    return {role: _windows(token_lists, s) for role, s in spans.items()}


def cut_prefixes(
    token_lists: list[list[int]], prefix_tokens: int, count: int, seed: int
) -> np.ndarray:
    """`count` non-overlapping windows of `prefix_tokens` tokens, chosen with a fixed seed (the
    decide role of `cut_roles`)."""
    return cut_roles(token_lists, prefix_tokens, {"decide": count}, seed)["decide"]


def _as_counts(scored: int | Mapping[str, int]) -> dict[str, int]:
    return {"decide": scored} if isinstance(scored, int) else dict(scored)


def cut_calibration(
    token_lists: list[list[int]],
    length: int,
    count: int,
    seed: int,
    scored_prefix_tokens: int,
    scored_count: int | Mapping[str, int],
) -> np.ndarray:
    """`count` windows of `length` tokens that overlap none of the scored prefixes: those
    `role_spans(token_lists, scored_prefix_tokens, scored_count, seed)` picks for every role
    (`scored_count` an int: decide alone)."""
    roles = role_spans(token_lists, scored_prefix_tokens, _as_counts(scored_count), seed)
    scored = [span for spans in roles.values() for span in spans]
    free = [s for s in _spans(token_lists, length) if not _overlaps(s, scored)]
    spans = _choose(free, count, seed + 1, f"calibration windows of {length} tokens")
    return _windows(token_lists, spans)


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
    """int64 [count, prefix_tokens] token prefixes from `source` (`self` needs `engine`): the
    decide role of `load_roles`.

    Raises ValueError naming the source and what is wrong with it."""
    drawn = load_roles(source, model_dir, {"decide": count}, prefix_tokens, engine, seed)
    return drawn.prefixes["decide"]


@dataclass
class DrawnRoles:
    """Each role's prompts and, for a text source, where they lie in it."""

    prefixes: dict[str, np.ndarray]  # role -> int64 [count, prefix_tokens]
    # role -> (text index, first token, one past the last) per prompt; None: `self` and `run:`
    windows: dict[str, list[Span]] | None = None


def roles_record(
    source: str,
    counts: Mapping[str, int],
    prefix_tokens: int,
    seed: int,
    drawn: DrawnRoles | None = None,
) -> dict[str, dict[str, Any]]:
    """What run.json keeps of each role: enough to name its prompts (their windows in a text
    source, or their sampler seeds for `self`) and to see, on resume, that a job would now draw
    other ones (another file content, tokenizer or seed). `drawn`: the prompts as cut on the
    driver (None for `self`: its tokens are known once an engine samples them)."""
    record = {}
    for role, count in counts.items():
        if not count:
            continue
        prefixes = None if drawn is None else drawn.prefixes[role]
        windows = None if drawn is None or drawn.windows is None else drawn.windows[role]
        record[role] = {
            "source": source,
            "count": int(count),
            "prefix_tokens": prefix_tokens,
            "seed": role_seed(seed, role),
            "windows": None if windows is None else [list(w) for w in windows],
            "tokens_sha256": None if prefixes is None else tokens_digest(prefixes),
        }
    return record


def tokens_digest(prefixes: np.ndarray) -> str:
    """A short digest of token ids (as int64, row by row)."""
    data = np.ascontiguousarray(prefixes, dtype=np.int64)
    return hashlib.sha256(str(data.shape).encode() + data.tobytes()).hexdigest()[:16]


def load_roles(
    source: str,
    model_dir: str | Path,
    counts: Mapping[str, int],
    prefix_tokens: int,
    engine: Engine | None = None,
    seed: int = 0,
) -> DrawnRoles:
    """Per role of `counts` (decide, validate, test; count 0 leaves a role out), int64
    [count, prefix_tokens] token prefixes from `source`, no window of one role overlapping
    another's (`self`, which needs `engine`: each role from its own sampler seeds; `run:<dir>`:
    that run's own prompts of each role).

    Raises ValueError naming the source and what is wrong with it."""
    counts = {role: int(counts.get(role) or 0) for role in ROLES}
    if any(n < 0 for n in counts.values()) or counts["decide"] < 1 or prefix_tokens < 1:
        raise ValueError(
            f"need count >= 1 and prefix_tokens >= 1, got {counts['decide']}, {prefix_tokens}"
        )
    if source.startswith(RUN_PREFIX):
        run_dir = source[len(RUN_PREFIX) :]
        return DrawnRoles(
            {role: run_prefixes(run_dir, n, prefix_tokens, role) for role, n in counts.items() if n}
        )
    # Texts first: a broken file is reported before the tokenizer even loads.
    texts = None if source == "self" else read_texts(source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if texts is None:
        if engine is None:
            raise ValueError("prompt source 'self' samples from the model and needs an engine")
        bos = _bos_id(tokenizer)
        return DrawnRoles(
            {
                role: sample_prefixes(engine, bos, prefix_tokens, n, role_seed(seed, role))
                for role, n in counts.items()
                if n
            }
        )
    try:
        tokens = _tokenize(tokenizer, texts)
        spans = role_spans(tokens, prefix_tokens, counts, seed)
        return DrawnRoles({role: _windows(tokens, s) for role, s in spans.items()}, spans)
    except ValueError as err:
        raise ValueError(f"prompt source {source}: {err}") from None


def run_prefixes(run_dir: str, count: int, prefix_tokens: int, role: str = "decide") -> np.ndarray:
    """The first `count` prompts of `role` that another run drew (decide: its round-0 reference;
    validate, test: its held-out references), cut to `prefix_tokens`: the way to measure two
    runs (two engines, two dtypes) on the same prompts."""
    from dtm_ray.records.store import RunStore

    store = RunStore(run_dir)
    source = f"{RUN_PREFIX}{run_dir}"
    if store.read_run_info() is None:
        raise ValueError(f"prompt source {source}: {store.location} is not a run directory")
    table = store.read_reference(0, role)
    if table is None:
        if role == "decide":
            raise ValueError(f"prompt source {source}: the run has no round-0 reference yet")
        raise ValueError(
            f"prompt source {source} holds no {role} prompts (a probe-only run, or one from an "
            f"older dtm-ray, or not that far yet); a compressing job needs them: use a text "
            f"source, or a compressing run's directory"
        )
    prefixes = np.asarray(table.column("prefix_ids").to_pylist(), dtype=np.int64)
    have_count, have_tokens = prefixes.shape
    if have_count < count or have_tokens < prefix_tokens:
        key = {
            "decide": "prompts.count",
            "validate": "prompts.validate_count",
            "test": "evaluation.prompts",
        }[role]
        raise ValueError(
            f"prompt source {source} holds {have_count} {'' if role == 'decide' else role + ' '}"
            f"prefixes of {have_tokens} tokens; {key} ({count}) and prompts.prefix_tokens "
            f"({prefix_tokens}) must not exceed them"
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
    scored_count: int | Mapping[str, int],
    scored_prefix_tokens: int,
    engine: Engine | None = None,
    seed: int = 0,
) -> np.ndarray:
    """int64 [count, length] calibration sequences from `source`, disjoint from every role's
    prompts that `load_roles(source, ..., scored_count, scored_prefix_tokens, seed=seed)`
    gives (`scored_count` an int: decide alone)."""
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
    avoid: list[tuple[str, int | Mapping[str, int], int, int]],
) -> np.ndarray:
    """int64 [W, length]: every window of `length` tokens of `source` on a grid from each text's
    start, leaving out those that overlap the windows `load_roles(s, counts, tokens, seed)`
    picks, for each (s, counts, tokens, seed) of `avoid` whose source is this one (counts an
    int: decide alone).

    Raises ValueError when the source is not text or gives no window."""
    if source == "self" or source.startswith(RUN_PREFIX):
        raise ValueError(f"training needs text, and {source!r} holds none")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = _token_lists(tokenizer, source)
    taken: list[Span] = []
    for other, counts, other_tokens, seed in avoid:
        if other == source:
            roles = role_spans(tokens, other_tokens, _as_counts(counts), seed)
            taken += [span for spans in roles.values() for span in spans]
    free = [s for s in _spans(tokens, length) if not _overlaps(s, taken)]
    if not free:
        raise ValueError(
            f"text {source} gives no window of {length} tokens apart from the scored prompts "
            "and the evaluation text"
        )
    return np.asarray([tokens[t][a:b] for t, a, b in free], dtype=np.int64)
