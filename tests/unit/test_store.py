"""The run directory on its own: atomic files, dedupe on read, config checks on resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtm_ray.core.state import Reference
from dtm_ray.errors import ConfigError
from dtm_ray.job.resume import check_same_config, config_differences
from dtm_ray.job.spec import JobConfig
from dtm_ray.records import store as store_module
from dtm_ray.records.schemas import reference_from_table, reference_table
from dtm_ray.records.store import RunStore


def probe_row(
    component: str, spec: str = "int8", status: str = "ok", fdt0: int = 5, round_: int = 0
) -> dict:
    ok = status == "ok"
    return {
        "round": round_,
        "component": component,
        "layer": 0,
        "kind": "q",
        "spec": spec,
        "params": 16,
        "fdt": [fdt0, 8] if ok else None,
        "sdt": [1, 0] if ok else None,
        "fdt_mean": (fdt0 + 8) / 2 if ok else None,
        "fdt_at_75": fdt0 if ok else None,
        "sdt_mean": 0.5 if ok else None,
        "nll_mean": 1.25 if ok else None,
        "seconds": 0.1,
        "worker": "engine-0",
        "attempts": 1,
        "status": status,
        "error": None if ok else "KeyError: boom",
    }


def test_probe_rows_round_trip_with_their_types(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "run"))
    store.write_probe_rows([probe_row("a"), probe_row("b", status="failed")], 0)
    table = store.read_probes()
    assert table.num_rows == 2
    assert table.schema.field("fdt").type == pa.list_(pa.int32())
    rows = table.to_pylist()
    assert rows[0]["fdt"] == [5, 8] and rows[0]["fdt_at_75"] == 5
    assert rows[1]["status"] == "failed" and rows[1]["fdt"] is None
    assert rows[1]["error"] == "KeyError: boom"


def test_a_file_is_invisible_until_it_is_complete(tmp_path: Path, monkeypatch) -> None:
    store = RunStore(str(tmp_path / "run"))
    seen_while_writing: list[list[str]] = []
    real_write = pq.write_table

    def watching_write(table, where, **kwargs):
        seen_while_writing.append(store.probe_files())
        real_write(table, where, **kwargs)

    monkeypatch.setattr(store_module.pq, "write_table", watching_write)
    store.write_probe_rows([probe_row("a")], 0)
    assert seen_while_writing == [[]]
    assert len(store.probe_files()) == 1


def test_a_crash_during_write_leaves_nothing_visible(tmp_path: Path, monkeypatch) -> None:
    store = RunStore(str(tmp_path / "run"))
    store.write_probe_rows([probe_row("a")], 0)

    def dying_write(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise KeyboardInterrupt  # what a killed driver looks like from inside

    monkeypatch.setattr(store_module.pq, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        store.write_probe_rows([probe_row("b")], 0)
    assert [r["component"] for r in store.read_probes().to_pylist()] == ["a"]
    assert sorted(p.name for p in (tmp_path / "run" / "probes").iterdir()) == [
        Path(store.probe_files()[0]).name
    ]


def test_leftover_temp_files_are_ignored_by_the_store_and_by_other_readers(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "run"))
    store.write_probe_rows([probe_row("a"), probe_row("b")], 0)
    # A SIGKILL between writing and renaming leaves a hidden temp file behind.
    probes = tmp_path / "run" / "probes"
    (probes / ".part-99-dead.parquet.1234abcd.tmp").write_bytes(b"PAR1 truncated")
    assert store.read_probes().num_rows == 2
    assert pq.read_table(probes).num_rows == 2  # pyarrow datasets (pandas, Polars) skip it too


def test_duplicates_are_dropped_on_read_ok_row_first(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "run"))
    store.write_probe_rows([probe_row("a", status="failed"), probe_row("b", fdt0=3)], 0)
    store.write_probe_rows([probe_row("a", fdt0=4), probe_row("b", fdt0=7)], 0)
    assert store.read_probes(dedupe=False).num_rows == 4
    rows = {r["component"]: r for r in store.read_probes().to_pylist()}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["status"] == "ok" and rows["a"]["fdt_at_75"] == 4  # ok beats failed
    assert rows["b"]["fdt_at_75"] == 3  # the earliest written wins among equals
    assert store.finished_probes(0) == {("a", "int8"), ("b", "int8")}
    assert store.finished_probes(1) == set()


def test_an_empty_run_dir_has_no_probes(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "nothing-yet"))
    assert store.read_probes().num_rows == 0
    assert store.read_reference(0) is None
    assert store.read_run_info() is None


def job_dict(**changes) -> dict:
    config = JobConfig(model="smollm2-135m", engine="hf").to_dict()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def test_resuming_keeps_the_first_run_json(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "run"))
    first = store.open_run(job_dict(), {"created": "first"})
    again = store.open_run(job_dict(), {"created": "second"})
    assert first["created"] == again["created"] == "first"
    assert store.read_run_info()["config"] == job_dict()


def test_operational_keys_may_change_on_resume() -> None:
    changed = job_dict(
        out="elsewhere",
        workers=8,
        resources_per_worker={"GPU": 1},
        max_in_flight_per_worker=4,
        max_probe_retries=0,
    )
    assert config_differences(job_dict(), changed) == []
    check_same_config(job_dict(), changed, "run")


def test_a_changed_config_names_every_differing_key() -> None:
    changed = job_dict(new_tokens=16, prompts__count=8, probe__specs=["int8"], workers=3)
    with pytest.raises(ConfigError) as err:
        check_same_config(job_dict(), changed, "run")
    message = str(err.value)
    assert "new_tokens: 64 in the run, 16 now" in message
    assert "prompts.count: 32 in the run, 8 now" in message
    assert "probe.specs" in message
    assert "workers" not in message
    assert "\n" not in message
    assert config_differences(job_dict(), changed) == ["new_tokens", "probe.specs", "prompts.count"]


def test_reference_round_trips_through_its_table(tmp_path: Path) -> None:
    reference = Reference(
        prefixes=np.array([[1, 7], [1, 9]]),
        continuation=np.array([[4, 5, 6], [7, 8, 9]]),
        base_argmax=np.array([[4, 5, 6], [7, 3, 3]]),
        base_margin=np.array([[0.5, 0.25, 2.0], [1.0, 0.125, np.nan]], dtype=np.float32),
    )
    store = RunStore(f"file://{tmp_path}/run")  # the URI form goes through the same pyarrow.fs
    store.write_reference(reference_table(reference, 0), 0)
    table = RunStore(str(tmp_path / "run")).read_reference(0)
    assert table.column("noise_positions").to_pylist() == [0, 2]
    assert table.column("min_margin").to_pylist() == [0.25, 0.125]
    # Without a comparison the current model is the reference's own: FDT = N, SDT = 0.
    assert table.column("current_fdt").to_pylist() == [3, 3]
    assert table.column("current_sdt").to_pylist() == [0, 0]
    back = reference_from_table(table)
    for name in ("prefixes", "continuation", "base_argmax"):
        np.testing.assert_array_equal(getattr(back, name), getattr(reference, name))
    np.testing.assert_array_equal(back.base_margin, reference.base_margin)
    assert (tmp_path / "run" / "reference" / "round-000.parquet").is_file()


def test_a_relative_run_dir_is_anchored_where_the_command_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = RunStore("runs/demo")
    store.write_probe_rows([probe_row("a")], 0)
    assert store.location == str(tmp_path / "runs" / "demo")
    assert len(list((tmp_path / "runs" / "demo" / "probes").glob("part-*.parquet"))) == 1


def test_compaction_merges_one_rounds_parts_and_a_kill_in_between_loses_nothing(
    tmp_path: Path,
) -> None:
    store = RunStore(str(tmp_path / "run"))
    store.write_probe_rows([probe_row("a"), probe_row("b")], 0)
    store.write_probe_rows([probe_row("c")], 0)
    store.write_probe_rows([probe_row("a", round_=1)], 1)
    assert len(store.probe_files()) == 3

    # What a compaction killed after writing the round file, before deleting the parts, leaves.
    store.write_round_table("probes", 0, store.read_probes(round_=0))
    assert store.read_probes(dedupe=False, round_=0).num_rows == 3 + 3  # parts + round file
    assert sorted(probe_keys_of(store.read_probes(round_=0))) == ["a", "b", "c"]

    store.compact_probes(0)  # the resumed run compacts again
    names = sorted(Path(p).name for p in store.probe_files())
    assert names[-1] == "round-000.parquet" and len(names) == 2  # round 1's part remains
    assert sorted(probe_keys_of(store.read_probes(round_=0))) == ["a", "b", "c"]
    assert probe_keys_of(store.read_probes(round_=1)) == ["a"]
    assert store.finished_probes(1) == {("a", "int8")}


def probe_keys_of(table: pa.Table) -> list[str]:
    return table.column("component").to_pylist()


# --- the probe writer: files by size and time, written off the driver's loop ---------------------
def test_the_probe_writer_flushes_by_size_and_by_time_and_writes_every_row_at_close(
    tmp_path: Path,
) -> None:
    import time

    from dtm_ray.loop.progress import ProbeWriter

    store = RunStore(str(tmp_path / "run"))
    writer = ProbeWriter(store, 0, every=3, seconds=0.3)
    for name in "abcd":  # three rows make a file; the fourth waits for time or close
        writer.add(probe_row(name))
    deadline = time.monotonic() + 10
    while len(store.probe_files()) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer thread writes it
    assert sorted(probe_keys_of(store.read_probes())) == ["a", "b", "c"]
    time.sleep(0.35)
    writer.flush_if_due()  # the fourth row is due by time
    writer.add(probe_row("e"))
    writer.close()  # and the fifth at close: every row once, in three files
    assert len(store.probe_files()) == 3
    assert sorted(probe_keys_of(store.read_probes(dedupe=False))) == ["a", "b", "c", "d", "e"]
