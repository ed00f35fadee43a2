import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.prompts import (
    check_source,
    cut_calibration,
    cut_prefixes,
    load_calibration,
    load_prompts,
    read_texts,
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
