"""Whether two model folders share a tokenizer: the same vocabulary (token -> id), the same
special ids, and the same cut of a sample text. Divergent Token Metrics compare token ids, so two
models whose ids mean different strings cannot be compared token by token; `dtm-ray compare`
refuses such a pair before any engine starts, naming what differs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The ids an engine's input and scoring depend on. Padding is left out: it is masked and never
# scored, and quantizing tools often set a pad token the original lacks.
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "unk_token_id")
# Cut by both tokenizers: the same vocabulary with other merges or normalization cuts it apart.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159 past noon, naïve café-goers "
    "said: «déjà vu»!\n\tdef main():\n        return {'key': [1, 2, 3]}  # 日本語のテキスト 🙂"
)


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def tokenizer_difference(base: Any, candidate: Any) -> str | None:
    """What differs between two loaded tokenizers, in one line; None when they agree."""
    base_vocab, candidate_vocab = base.get_vocab(), candidate.get_vocab()
    if base_vocab != candidate_vocab:
        return _vocab_difference(base_vocab, candidate_vocab)
    for name in SPECIAL_IDS:
        ours, theirs = getattr(base, name, None), getattr(candidate, name, None)
        if ours != theirs:
            return (
                f"{name.removesuffix('_id')} is id {ours} in the base and {theirs} in the candidate"
            )
    ours = base(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    theirs = candidate(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        at = min(len(ours), len(theirs)) if at is None else at
        return (
            "the vocabularies agree but the tokenizers cut text differently (other merges or "
            f"normalization): a sample text gives {len(ours)} and {len(theirs)} tokens, "
            f"first differing at token {at}"
        )
    return None


def _vocab_difference(base: dict[str, int], candidate: dict[str, int]) -> str:
    by_id = [{i: t for t, i in vocab.items()} for vocab in (base, candidate)]
    ids = sorted(set(by_id[0]) | set(by_id[1]))
    first = next(i for i in ids if by_id[0].get(i) != by_id[1].get(i))
    ours, theirs = (repr(names[first]) if first in names else "no token" for names in by_id)
    return (
        f"the vocabularies differ: the base has {len(base)} tokens, the candidate "
        f"{len(candidate)}; id {first} is {ours} in the base and {theirs} in the candidate"
    )
