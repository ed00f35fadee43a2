import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtm_ray.engines import prompts as prompts_module
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.prompts import (
    check_source,
    cut_calibration,
    cut_prefixes,
    cut_roles,
    load_calibration,
    load_prompts,
    load_roles,
    load_training,
    overlapping,
    read_texts,
    role_seed,
    role_spans,
)

PARAGRAPHS = [
    "The river rose through the night and by morning the lower fields were under water. "
    "Farmers moved their animals to the ridge and waited for the rain to stop.",
    "A small library in the town kept records of every flood since the bridge was built, "
    "written by hand in ledgers that smelled of dust and candle smoke.",
    "Engineers later proposed a levee, but the council argued for years about who should pay, "
    "and the river did not wait for them to decide.",
]


def test_cut_prefixes_windows_are_non_overlapping_and_seeded():
    tokens = [list(range(100)), list(range(1000, 1030))]
    a = cut_prefixes(tokens, 10, 5, seed=0)
    assert a.shape == (5, 10) and a.dtype == np.int64
    assert all(row[0] % 10 == 0 for row in a)  # every window starts on a 10-token boundary
    np.testing.assert_array_equal(a, cut_prefixes(tokens, 10, 5, seed=0))
    assert len({tuple(r) for r in cut_prefixes(tokens, 10, 13, seed=1)}) == 13


def test_too_few_prefixes_says_how_many_were_found():
    with pytest.raises(ValueError, match="only 3 prefixes of 10 tokens .2 non-empty texts.; 4"):
        cut_prefixes([list(range(25)), list(range(12))], 10, 4, seed=0)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_file_sources(tmp_path, tiny_llama_dir, suffix):
    path = tmp_path / f"texts{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(PARAGRAPHS))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in PARAGRAPHS))
    else:
        pq.write_table(pa.table({"text": PARAGRAPHS}), path)
    assert read_texts(str(path)) == PARAGRAPHS
    prefixes = load_prompts(str(path), tiny_llama_dir, count=4, prefix_tokens=8)
    assert prefixes.shape == (4, 8)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    all_tokens = [tok(t, add_special_tokens=False)["input_ids"] for t in PARAGRAPHS]
    windows = {tuple(t[i : i + 8]) for t in all_tokens for i in range(0, len(t) - 7, 8)}
    assert all(tuple(row) in windows for row in prefixes.tolist())


def test_self_source_samples_from_the_model(tiny_llama_dir):
    engine = HFEngine(tiny_llama_dir)
    a = load_prompts("self", tiny_llama_dir, count=3, prefix_tokens=6, engine=engine, seed=1)
    b = load_prompts("self", tiny_llama_dir, count=3, prefix_tokens=6, engine=engine, seed=1)
    assert a.shape == (3, 6) and np.all(a[:, 0] == 1)  # BOS first
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs an engine"):
        load_prompts("self", tiny_llama_dir, count=3, prefix_tokens=6)


@pytest.mark.parametrize(
    "source, message",
    [
        ("texts.csv", "must be 'self'"),
        ("missing.txt", "does not exist"),
        ("hf:wikitext", "hf:<dataset>"),
        ("hf::test", "hf:<dataset>"),
    ],
)
def test_bad_sources(source, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_source(source)


def test_hf_source_form_accepted_without_network():
    check_source("hf:wikitext:wikitext-2-raw-v1:test")
    check_source("hf:some/dataset:train")


def test_calibration_windows_never_overlap_the_scored_prefixes():
    # Two texts of 300 and 200 tokens whose token ids are their positions, offset per text.
    tokens = [list(range(300)), list(range(1000, 1200))]
    scored = cut_prefixes(tokens, 10, 6, seed=3)
    calibration = cut_calibration(tokens, 25, 3, 3, scored_prefix_tokens=10, scored_count=6)
    assert calibration.shape == (3, 25)
    scored_tokens = set(scored.flatten().tolist())
    for row in calibration.tolist():
        assert not scored_tokens & set(row), (row, sorted(scored_tokens))
    with pytest.raises(ValueError, match="calibration windows of 25 tokens"):
        cut_calibration(tokens, 25, 19, 3, scored_prefix_tokens=10, scored_count=6)


def test_pydoc_source_is_real_prose_that_ships_with_python(tiny_llama_dir):
    texts = read_texts("pydoc")
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000
    assert any("for" in t and "statement" in t for t in texts)
    a = load_prompts("pydoc", tiny_llama_dir, count=8, prefix_tokens=16, seed=0)
    assert a.shape == (8, 16) and len({tuple(r) for r in a.tolist()}) == 8
    np.testing.assert_array_equal(a, load_prompts("pydoc", tiny_llama_dir, 8, 16, seed=0))
    calibration = load_calibration("pydoc", tiny_llama_dir, 4, 48, 8, 16, seed=0)
    assert calibration.shape == (4, 48)


def test_self_calibration_uses_other_sampler_seeds(tiny_llama_dir):
    engine = HFEngine(tiny_llama_dir)
    scored = load_prompts("self", tiny_llama_dir, count=3, prefix_tokens=6, engine=engine)
    calibration = load_calibration("self", tiny_llama_dir, 3, 6, 3, 6, engine=engine)
    assert not {tuple(r) for r in scored.tolist()} & {tuple(r) for r in calibration.tolist()}


# --- prompt roles: decide, validate, test ------------------------------------------------------
ROLE_COUNTS = {"decide": 5, "validate": 4, "test": 12}


def assert_disjoint_windows(windows: dict) -> None:
    """No window of one role overlaps a window of another (same text, token ranges meet)."""
    roles = list(windows)
    for i, a in enumerate(roles):
        for b in roles[i + 1 :]:
            for t, start, end in windows[a]:
                for u, s, e in windows[b]:
                    assert not (t == u and start < e and s < end), (
                        a,
                        b,
                        (t, start, end),
                        (u, s, e),
                    )


def test_roles_on_token_lists_are_disjoint_and_keep_the_decide_draw():
    """The window logic every text source (files, pydoc, hf:) goes through, on token lists whose
    ids are their positions (unique across texts), so overlapping windows would share ids."""
    tokens = [list(range(300)), list(range(1000, 1200)), list(range(5000, 5045))]
    for seed in range(5):
        spans = role_spans(tokens, 10, ROLE_COUNTS, seed)
        assert {r: len(s) for r, s in spans.items()} == ROLE_COUNTS
        assert_disjoint_windows(spans)
        roles = cut_roles(tokens, 10, ROLE_COUNTS, seed)
        # Decide is exactly what a job without the other roles draws.
        np.testing.assert_array_equal(roles["decide"], cut_prefixes(tokens, 10, 5, seed))
        ids = {role: set(a.flatten().tolist()) for role, a in roles.items()}
        assert not ids["decide"] & ids["validate"] and not ids["decide"] & ids["test"]
        assert not ids["validate"] & ids["test"]
    # Each held-out role has its own seed: another seed moves them, not only decide.
    a, b = role_spans(tokens, 10, ROLE_COUNTS, 0), role_spans(tokens, 10, ROLE_COUNTS, 1)
    assert a["test"] != b["test"] and a["validate"] != b["validate"]
    with pytest.raises(
        ValueError, match=r"give only 54 prefixes .*; 5 decide \+ 4 validate \+ 50 test = 59 are"
    ):
        role_spans(tokens, 10, {**ROLE_COUNTS, "test": 50}, 0)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", "hf"])
def test_roles_from_files_and_hf_sources_never_overlap(
    tmp_path, tiny_llama_dir, suffix, monkeypatch
):
    texts = PARAGRAPHS * 4  # 12 texts, the same words: only the windows tell roles apart
    if suffix == "hf":  # no hub here: the dataset's texts, through the same code
        monkeypatch.setattr(prompts_module, "_hf_texts", lambda source: list(texts))
        source = "hf:some/dataset:train"
    else:
        path = tmp_path / f"texts{suffix}"
        if suffix == ".txt":
            path.write_text("\n\n".join(texts))
        elif suffix == ".jsonl":
            path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
        else:
            pq.write_table(pa.table({"text": texts}), path)
        source = str(path)
    counts = {"decide": 4, "validate": 4, "test": 8}
    drawn = load_roles(source, tiny_llama_dir, counts, prefix_tokens=8, seed=2)
    assert {r: a.shape for r, a in drawn.prefixes.items()} == {r: (n, 8) for r, n in counts.items()}
    assert_disjoint_windows(drawn.windows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for role, windows in drawn.windows.items():  # the prompts are the windows they name
        rows = [ids[t][a:b] for t, a, b in windows]
        assert drawn.prefixes[role].tolist() == rows
    decide = load_prompts(source, tiny_llama_dir, count=4, prefix_tokens=8, seed=2)
    np.testing.assert_array_equal(drawn.prefixes["decide"], decide)


def test_pydoc_roles_never_overlap_and_calibration_avoids_all_of_them(tiny_llama_dir):
    counts = {"decide": 8, "validate": 8, "test": 32}
    drawn = load_roles("pydoc", tiny_llama_dir, counts, prefix_tokens=16, seed=0)
    assert_disjoint_windows(drawn.windows)
    np.testing.assert_array_equal(
        drawn.prefixes["decide"], load_prompts("pydoc", tiny_llama_dir, 8, 16)
    )
    calibration = load_calibration("pydoc", tiny_llama_dir, 4, 48, counts, 16, seed=0)
    scored = np.concatenate(list(drawn.prefixes.values()))
    assert not overlapping(calibration, scored, 16).any()


def test_calibration_windows_avoid_every_role():
    tokens = [list(range(300)), list(range(1000, 1200))]
    counts = {"decide": 6, "validate": 6, "test": 12}
    roles = cut_roles(tokens, 10, counts, 3)
    calibration = cut_calibration(tokens, 25, 3, 3, scored_prefix_tokens=10, scored_count=counts)
    scored = set(np.concatenate(list(roles.values())).flatten().tolist())
    for row in calibration.tolist():
        assert not scored & set(row)


def test_self_roles_sample_from_their_own_seeds(tiny_llama_dir):
    engine = HFEngine(tiny_llama_dir)
    counts = {"decide": 3, "validate": 3, "test": 4}
    drawn = load_roles("self", tiny_llama_dir, counts, prefix_tokens=6, engine=engine, seed=1)
    assert drawn.windows is None
    rows = {role: {tuple(r) for r in a.tolist()} for role, a in drawn.prefixes.items()}
    assert not rows["decide"] & rows["validate"] and not rows["decide"] & rows["test"]
    assert not rows["validate"] & rows["test"]
    decide = load_prompts("self", tiny_llama_dir, count=3, prefix_tokens=6, engine=engine, seed=1)
    np.testing.assert_array_equal(drawn.prefixes["decide"], decide)
    # Prompt i of a role samples with seed role_seed + i: the ranges of the roles (and of the
    # calibration samples) never meet for fewer than a million prompts.
    starts = sorted([role_seed(1, r) for r in counts] + [1 + 1_000_003])
    assert all(b - a >= 1_000_000 for a, b in zip(starts, starts[1:], strict=False))
    validate = load_prompts(
        "self", tiny_llama_dir, 3, 6, engine=engine, seed=role_seed(1, "validate")
    )
    np.testing.assert_array_equal(drawn.prefixes["validate"], validate)


def test_training_text_avoids_the_windows_of_every_role(tiny_llama_dir, monkeypatch):
    # Token ids that are their positions: a training window shares ids with a prompt only
    # where their windows overlap (real text repeats itself; the run filters those too).
    tokens = [list(range(400)), list(range(1000, 1300))]
    monkeypatch.setattr(prompts_module, "_token_lists", lambda tokenizer, source: tokens)
    counts = {"decide": 6, "validate": 6, "test": 12}
    roles = cut_roles(tokens, 10, counts, 0)
    training = load_training("pydoc", tiny_llama_dir, 20, [("pydoc", counts, 10, 0)])
    assert len(training) > 0
    used = set(training.flatten().tolist())
    for role, prefixes in roles.items():
        assert not used & set(prefixes.flatten().tolist()), role
