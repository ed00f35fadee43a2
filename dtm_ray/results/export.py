"""`dtm-ray export`: a finished compressing run as a checkpoint that serving stacks load.

The output folder (default `<run_dir>/export/`) holds:

- the model's Hugging Face safetensors checkpoint, same shards and index, with every selected
  component's chain replayed on its original weight: pruned entries are zeros, quantized entries
  their dequantized values, so transformers and vLLM load it as a dense model. Chains are replayed
  in the dtype the run's engines held the weights in (what the run measured), then cast to the
  checkpoint's own dtype for saving; the two differ only when a job set `dtype` below the
  checkpoint's. Every other tensor and every non-weight file is copied unchanged.
- `sparsity_map.json` and `precision_map.json`: weight name -> share of zeros of the exported
  tensor, and -> its quantization spec (or the saved dtype), for every selected component.
- `recipe.yaml`: an llm-compressor recipe that reproduces the *allocation* with llm-compressor's
  own algorithms and rounding: `SparseGPTModifier` (`WandaPruningModifier` for wanda runs) with
  one sparsity per pruned module in module order, and a `QuantizationModifier` with one config
  group per precision. Its weights are not the measured ones (llm-compressor's int scales are
  absmax/7.5 and absmax/127.5 against dtm_ray's absmax/7 and absmax/127; SparseGPT updates the
  kept weights); the checkpoints hold the measured ones.
- `compressed/` (`--format compressed` or `both`; `auto`, the default, writes it for a quantize
  run): a compressed-tensors checkpoint holding the quantized components packed, decoding to
  exactly the measured weights (see `export_compressed`). With `--format compressed` the top
  folder holds no dense weights, only the maps, the recipe, `export.json` and `compressed/`.
- `export.json`: the run, the model, the final summary row, which checkpoints were written, one-line
  notes on what each serving engine cannot load, the export time and version.

Everything is written into a hidden folder beside the target and renamed at the end, so a killed
export never leaves half a folder. A write that fails (a full disk, no permission) is retried and
mapped as a run dir's writes are (`records.store.retrying`): one line naming the file and the
export, exit 1, the hidden folder removed; the same command writes the same files once there is
room.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

import dtm_ray
from dtm_ray.core.components import KINDS, components_from_config
from dtm_ray.core.serving import serving_notes
from dtm_ray.core.specs import parse_spec, precision_of
from dtm_ray.core.state import ModelState
from dtm_ray.errors import ConfigError
from dtm_ray.records.schemas import (
    CALIBRATION_SCHEMA,
    FINAL_SUMMARY_SCHEMA,
    RECOVERY_SCHEMA,
    STATE_SCHEMA,
    calibration_from_table,
    state_from_table,
)
from dtm_ray.records.store import RunStore, check_store_uri
from dtm_ray.redact import redact, redact_data
from dtm_ray.results.export_compressed import stored_level, write_compressed
from dtm_ray.results.export_dense import replay_device, torch_threads, write_dense
from dtm_ray.results.model_files import write_file
from dtm_ray.results.roles import role_numbers

_MARKER = "export.json"  # its presence tells a previous export, which may be replaced

# Weight formats of each quantization spec as llm-compressor's QuantizationArgs; all weight-only,
# symmetric, static, like dtm_ray's round-to-nearest specs.
_QUANT_ARGS: dict[str, dict[str, Any]] = {
    "int8": {"num_bits": 8, "type": "int", "strategy": "channel"},
    "int8-tensor": {"num_bits": 8, "type": "int", "strategy": "tensor"},
    "int4": {"num_bits": 4, "type": "int", "strategy": "group"},
    "fp8-e4m3": {"num_bits": 8, "type": "float", "strategy": "channel"},
}
RECIPE_NOTE = (
    "recipe.yaml reproduces the allocation with llm-compressor's own algorithms and rounding, "
    "not the measured weights; the checkpoints hold those"
)
_DTYPE_OF_ITEMSIZE = {4: "float32", 2: "bfloat16"}  # what `dtype: auto` resolves to


FORMATS = ("auto", "dense", "compressed", "both")
COMPRESSED = "compressed"  # the compressed checkpoint's folder inside the export


def export_run(
    run_dir: str,
    out: str | None = None,
    fmt: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> Path | str:
    """Export the final state of the compressing run in `run_dir`; returns the output folder
    (the export's URI for a run on an object store: it exports into its own `export/`).
    `fmt`: which checkpoints to write; `auto` is `both` for a quantize run (the dense one for
    tools that read plain weights, the compressed one to serve) and `dense` for a sparsify run
    (compressed-tensors has no sparse format any more). `device`: where chains are replayed
    (`auto`: cuda when torch sees a GPU, else cpu); `threads`: torch's threads meanwhile (None:
    every core this process may use). The files are the same on every device and thread count."""
    check_store_uri(run_dir)  # before torch looks for a device: a malformed URI is one line
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} is not a whole number >= 1")
    replay_on = replay_device(device)  # a device this machine lacks is refused before any work
    store = RunStore(run_dir)
    info = store.read_run_info()
    if info is None:
        raise ConfigError(f"{store.location} is not a run directory: it has no run.json")
    config = info.get("config", {})
    if not config.get("compress"):
        raise ConfigError(
            f"run {store.location} is a probe-only run: it compressed nothing to export"
        )
    summary = store.read_final("summary", FINAL_SUMMARY_SCHEMA)
    states = _final_states(store)
    if summary is None or states is None:
        raise ConfigError(
            f"run {store.location} has no final state yet; finish it with `dtm-ray run JOB` first"
        )
    if out is not None and "://" in out and not out.startswith("file://"):
        raise ConfigError(
            f"--out {out} is not a local folder; a run on an object store exports into its own "
            "export/ when --out is left out"
        )
    if out is None and not store.is_local:
        sink: _Sink = _StoreSink(store, "export")
    else:
        local = Path(out.removeprefix("file://")) if out is not None else None
        sink = _FolderSink(local or Path(store.root) / "export")
    quantize = config["compress"].get("method") == "quantize"
    if fmt == "auto":
        fmt = "both" if quantize else "dense"

    # The originals the run measured, as this node holds them (fetched once into its cache).
    from dtm_ray.engines.base import torch_dtype
    from dtm_ray.engines.sources import node_folder, source_of_run

    model_dir = node_folder(source_of_run(info))
    # NaN (a perplexity that could not be measured) is not JSON; null is.
    summary_row = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in summary.to_pylist()[0].items()
    }
    engine_dtype = _engine_dtype(config.get("dtype", "auto"), summary_row)
    state = final_state(store, states, _calibration(store, states))
    # Module order (layer, then q k v o gate up down): the order llm-compressor matches targets.
    rows = sorted(states.to_pylist(), key=lambda r: (r["layer"], KINDS.index(r["kind"])))

    scratch = write_file(sink.where, "a scratch folder", sink.scratch)
    try:
        dense = fmt != COMPRESSED
        with torch_threads(threads):
            saved = write_dense(
                model_dir,
                scratch,
                state,
                torch_dtype(engine_dtype),
                dense,
                sink.shard_done,
                replay_on,
                sink.where,
            )
        missing = [r["component"] for r in rows if r["component"] not in saved]
        if missing:
            raise ConfigError(f"the checkpoint in {model_dir} has no weight {missing[0]!r}")
        sparsity = {r["component"]: saved[r["component"]][0] for r in rows}
        precision = {
            r["component"]: precision_of(r["chain"], saved[r["component"]][1]) for r in rows
        }
        linears = components_from_config(json.loads((model_dir / "config.json").read_text()))
        levels = {r["component"]: stored_level(r["chain"]) for r in rows}
        checkpoints = {"dense": "."} if fmt != COMPRESSED else {}
        if fmt != "dense":
            write_file(sink.where, f"{COMPRESSED}/", (scratch / COMPRESSED).mkdir)
            with torch_threads(threads):
                write_compressed(
                    model_dir,
                    scratch / COMPRESSED,
                    state,
                    engine_dtype,
                    linears,
                    sink.shard_done,
                    replay_on,
                    f"{sink.where}/{COMPRESSED}",
                )
            checkpoints["compressed"] = COMPRESSED
        _write_json(sink.where, scratch / "sparsity_map.json", sparsity)
        _write_json(sink.where, scratch / "precision_map.json", precision)
        recipe = _recipe(rows, sparsity, precision)
        header = redact(_recipe_header(store.location, config, summary_row))
        text = header + yaml.safe_dump(recipe, sort_keys=False)
        write_file(sink.where, "recipe.yaml", lambda: (scratch / "recipe.yaml").write_text(text))
        meta = {
            "run_dir": store.location,
            "model": config["model"],
            "model_dir": str(model_dir),
            "method": config["compress"].get("method"),
            "engine_dtype": engine_dtype,
            # FDT against the dense model, the held-out test prompts first (`final/summary`).
            "fdt": fdt_by_role(summary_row),
            "summary": summary_row,
            "checkpoints": checkpoints,
            "serving": serving_notes(linears, levels, engine_dtype) if quantize else {},
            "recipe": RECIPE_NOTE,
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dtm_ray": dtm_ray.__version__,
        }
        _write_json(sink.where, scratch / _MARKER, meta)  # written last: a complete export
        return sink.finish()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- the run -------------------------------------------------------------------------------------
def _final_states(store: RunStore) -> pa.Table | None:
    """The last round's rows of `states/`, or None when no round was committed."""
    table = store.read_round_table("states", STATE_SCHEMA)
    if table is None or table.num_rows == 0:
        return None
    last = pc.max(table.column("round")).as_py()
    return table.filter(pc.equal(table.column("round"), last))


def final_state(
    store: RunStore, states: pa.Table, calibration: Mapping[int, Mapping[str, Any]]
) -> ModelState:
    """The state the run ended in: its last committed round's, or the base that round's
    recovery trained (recovery/round-r commits it)."""
    state, _ = state_from_table(states, calibration, store.base_location)
    last = pc.max(states.column("round")).as_py()
    if store.read_round_table("recovery", RECOVERY_SCHEMA, last) is not None:
        return ModelState({}, store.base_location(last))
    return state


def _calibration(store: RunStore, states: pa.Table) -> dict[int, dict[str, Any]]:
    """round -> component -> input norm, for the rounds the wanda links name."""
    rounds = {r for chain in states.column("stats_rounds").to_pylist() for r in chain}
    out = {}
    for round_ in sorted(r for r in rounds if r is not None):
        table = store.read_round_table("calibration", CALIBRATION_SCHEMA, round_)
        if table is None:
            raise ConfigError(f"run {store.location} lacks calibration round {round_} for wanda")
        out[round_] = calibration_from_table(table)
    return out


def _engine_dtype(dtype: str, summary: Mapping[str, Any]) -> str:
    """The dtype the run's engines held the weights in. `auto` depends on the machine the run
    used, not this one, so it is read back from the summary's bytes per selected parameter."""
    if dtype != "auto":
        return dtype
    itemsize = summary["dense_bytes"] // max(1, summary["selected_params"])
    return _DTYPE_OF_ITEMSIZE.get(itemsize, "float32")


# --- the llm-compressor recipe -------------------------------------------------------------------
def _module(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def _recipe(
    rows: Sequence[Mapping[str, Any]], sparsity: Mapping[str, float], precision: Mapping[str, str]
) -> dict[str, Any]:
    """Stages for llm-compressor. `rows` come in module order: the pruning modifier applies its
    `sparsity` list, one value per matched module, in that order."""
    recipe: dict[str, Any] = {}
    chains = {r["component"]: [parse_spec(s) for s in r["chain"]] for r in rows}
    pruned = [n for n, chain in chains.items() if any(s.is_pruning for s in chain)]
    if pruned:
        wanda = any(s.method == "wanda" for n in pruned for s in chains[n])
        modifier = "WandaPruningModifier" if wanda else "SparseGPTModifier"
        args = {
            "targets": [_module(n) for n in pruned],  # exact module names, matched in order
            "sparsity": [float(sparsity[n]) for n in pruned],
            "mask_structure": "0:0",  # unstructured, like magnitude and wanda
            "ignore": ["re:.*lm_head"],
        }
        recipe["sparsity_stage"] = {"sparsity_modifiers": {modifier: args}}
    groups: dict[str, list[str]] = {}
    for name, chain in chains.items():
        if any(not s.is_pruning for s in chain):
            groups.setdefault(precision[name], []).append(_module(name))
    if groups:
        config_groups = {
            f"group_{i}": {"targets": targets, "weights": _weight_args(level)}
            for i, (level, targets) in enumerate(groups.items())
        }
        args = {"ignore": ["lm_head"], "config_groups": config_groups}
        recipe["quantization_stage"] = {"quantization_modifiers": {"QuantizationModifier": args}}
    return recipe


def _weight_args(level: str) -> dict[str, Any]:
    spec = parse_spec(level)
    args = {**_QUANT_ARGS[spec.method], "symmetric": True, "dynamic": False}
    if spec.group is not None:
        args["group_size"] = spec.group
    return args


def fdt_by_role(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`final/summary`'s FDT numbers per role, test first; decide marked in-sample."""
    return {
        role if role != "decide" else "decide (in-sample)": dict(numbers)
        for role, numbers in role_numbers(summary)
    }


def _recipe_header(location: str, config: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    compress = config["compress"]
    if compress.get("method", "sparsify") == "sparsify":
        what = (
            f"per-module sparsity ({compress.get('criterion')}, overall {summary['sparsity']:.4f})"
        )
    else:
        what = f"per-module precision (levels {', '.join(compress.get('levels') or [])})"
    lines = [
        f"llm-compressor recipe from `dtm-ray export` (dtm_ray {dtm_ray.__version__})",
        f"run: {location}",
        f"model: {config['model']}; guide: {compress.get('guide')}",
        f"reproduces the run's {what}",
        "with llm-compressor's own algorithms; the exported checkpoint holds dtm_ray's values.",
        "result against the dense model, FDT@75 of "
        f"{summary['new_tokens']}: "
        + "; ".join(
            f"{numbers['fdt_at_75']} ({numbers['fdt_at_75_low']}-{numbers['fdt_at_75_high']}) "
            f"on {numbers['prompts']} {role if role != 'decide' else 'decide (in-sample)'} prompts"
            for role, numbers in role_numbers(summary)
        ),
    ]
    return "".join(f"# {line}\n" for line in lines)


# --- files ---------------------------------------------------------------------------------------
def _write_json(where: str, path: Path, data: Any) -> None:
    text = json.dumps(redact_data(data), indent=2, default=str) + "\n"
    write_file(where, path.name, lambda: path.write_text(text))


def _check_target(target: Path) -> None:
    """Only an empty folder or a previous export may be replaced: --out never deletes user data."""
    if target.exists() and (
        not target.is_dir() or (any(target.iterdir()) and not (target / _MARKER).is_file())
    ):
        raise ConfigError(f"{target} exists and is not a dtm_ray export; choose another --out")


class _Sink:
    """Where an export goes: files are written into `scratch()`; `shard_done` is told of each
    weight shard as soon as it is written; `finish()` puts the rest in place, export.json last."""

    where: str

    def scratch(self) -> Path:
        raise NotImplementedError

    def shard_done(self, path: Path) -> None:
        pass

    def finish(self) -> Path | str:
        raise NotImplementedError


class _FolderSink(_Sink):
    """A local folder: everything is written into a hidden folder beside it, renamed at the
    end (a killed export never leaves half a folder)."""

    def __init__(self, target: Path) -> None:
        _check_target(target)
        self.target, self.where = target, str(target)
        self._scratch: Path | None = None

    def scratch(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f".{self.target.name}-", dir=self.target.parent)
        self._scratch = Path(folder)
        self._scratch.chmod(0o755)  # mkdtemp makes it private; a model folder is meant to be shared
        return self._scratch

    def finish(self) -> Path:
        assert self._scratch is not None
        scratch = self._scratch
        write_file(self.where, "the finished folder", lambda: _replace(scratch, self.target))
        return self.target


class _StoreSink(_Sink):
    """A folder of a run dir on an object store, written shard by shard: each shard is uploaded
    as soon as it is written and deleted from the local scratch folder, so the driver's disk
    never holds more than one shard of the export. The previous export is removed first and
    export.json is uploaded last: a folder without it is an unfinished export."""

    def __init__(self, store: RunStore, folder: str) -> None:
        self.store, self.folder = store, folder
        self.where = store.child_uri(folder).split("?", 1)[0]
        files = store.folder_files(folder)
        if files and _MARKER not in files:
            raise ConfigError(
                f"{self.where} exists and is not a dtm_ray export; move it away and export again"
            )
        self._scratch: Path | None = None

    def scratch(self) -> Path:
        self.store.delete(f"{self.folder}/{_MARKER}")  # from now on the old export is unfinished
        self.store.clear_folder(self.folder)
        self._scratch = Path(tempfile.mkdtemp(prefix=".dtm-ray-export-"))
        return self._scratch

    def shard_done(self, path: Path) -> None:
        self._put(path)
        path.unlink()

    def _put(self, path: Path) -> None:
        assert self._scratch is not None
        self.store.put_file(path, f"{self.folder}/{path.relative_to(self._scratch)}")

    def finish(self) -> str:
        assert self._scratch is not None
        files = sorted(p for p in self._scratch.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == _MARKER):  # the marker last
            self._put(path)
        return self.store.child_uri(self.folder)


def _replace(scratch: Path, target: Path) -> None:
    """Move the finished folder into place; a previous export is swapped out, then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        target.rename(old / target.name)
    scratch.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
