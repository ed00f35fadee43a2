"""Checks on finished runs and engines, shared by the tests: the result of a disturbed run against
the undisturbed one, every probe exactly once, a run's FDT/SDT against an engine in this process,
and one digest of a model's weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def visible_probe_files(run: Path) -> list[Path]:
    folder = run / "probes"
    return (
        [p for p in folder.glob("*.parquet") if not p.name.startswith(".")]
        if folder.is_dir()
        else []
    )


def final_state(run: Path) -> dict[str, list[str]]:
    states = pd.read_parquet(run / "states")
    last = states[states["round"] == states["round"].max()]
    return {r.component: list(r.chain) for r in last.itertuples()}


def assert_same_result(run: Path, undisturbed: Path) -> None:
    """The run's tables equal the undisturbed run's: every probe once, the same final state and
    final prompts, and no visible table file half-written."""
    probes = pd.read_parquet(run / "probes")
    assert not probes.duplicated(["round", "component", "spec"]).any()
    expected = pd.read_parquet(undisturbed / "probes")
    assert len(probes) == len(expected)
    assert final_state(run) == final_state(undisturbed)
    final, expected_final = (pd.read_parquet(r / "final" / "prompts") for r in (run, undisturbed))
    pd.testing.assert_frame_equal(final, expected_final)
    for path in visible_files(run):
        if path.suffix == ".parquet":
            pq.read_table(path)  # every visible table file is whole


def table_values(run_dir: str) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
    """(component, spec) -> (FDT, SDT) of each probe a run stored."""
    from dtm_ray.records.store import RunStore

    rows = RunStore(run_dir).read_probes().to_pylist()
    return {(r["component"], r["spec"]): (r["fdt"], r["sdt"]) for r in rows}


def in_process_values(
    model_dir: Path, run_dir: str, probes: list[tuple[str, str]], n_new: int
) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
    """FDT/SDT of each probe from an HFEngine in this process, on the prompts the run stored.

    The reference is rebuilt here from those prompts and must equal the stored one, so the run's
    greedy continuations and base argmax are checked as well as its probes.
    """
    import torch

    from dtm_ray.engines.hf import HFEngine
    from dtm_ray.engines.probe import build_reference, run_probe
    from dtm_ray.records.schemas import reference_from_table
    from dtm_ray.records.store import RunStore

    stored = reference_from_table(RunStore(run_dir).read_reference(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each engine actor, so both take the same kernels
    try:
        engine = HFEngine(model_dir, batch_size=16)
        reference = build_reference(engine, stored.prefixes, n_new)
        np.testing.assert_array_equal(reference.continuation, stored.continuation)
        np.testing.assert_array_equal(reference.base_argmax, stored.base_argmax)
        values = {}
        for component, spec in probes:
            result = run_probe(engine, reference, component, spec)
            values[(component, spec)] = (result.fdt.tolist(), result.sdt.tolist())
        return values
    finally:
        torch.set_num_threads(threads)


def assert_every_probe_exactly_once(run_dir: str, checked) -> None:  # noqa: ANN001
    """Round 0 of the run holds each of the checked job's probes once, all ok."""
    from dtm_ray.records.schemas import probe_keys
    from dtm_ray.records.store import RunStore

    raw = RunStore(run_dir).read_probes(dedupe=False)
    keys = list(probe_keys(raw))
    assert len(keys) == len(set(keys)), "a probe was written twice"
    assert set(keys) == {(0, c.name, s) for c, s in checked.probes}
    assert set(raw.column("status").to_pylist()) == {"ok"}


def weights_digest(model) -> str:  # noqa: ANN001
    """SHA-256 over every tensor of a torch module's state dict (an engine: its model's), by
    name: equal digests, bit-identical weights."""
    import torch

    model = getattr(model, "model", model)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
