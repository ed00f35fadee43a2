"""A whole compressing run with its model and its run dir on the local S3 server, then show, report,
export and evaluate on the URI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import yaml
from support.jobs import SHORT, UNIFORM_HALF, tiny_job
from support.s3_server import model_uri

from dtm_ray import cli
from dtm_ray.engines.sources import (
    STORE,
)


def test_a_compressing_run_model_and_run_dir_on_s3_with_show_report_export_and_evaluate(
    ray_session, model_store, tiny_llama_dir: Path, node_cache: Path, tmp_path: Path, capsys
) -> None:
    """Model and run dir both on the store: of the two actors on this node one fetches the
    model, the other waits for it and reads the same copy; the run writes its report and export
    into the store (the export shard by shard), lm-eval's worker reads the export from there,
    and `show`, `report` and `export` work on the URI. The export equals one made from a local
    copy of the run. (tests/e2e/test_multi_node_models.py checks the FDTs against a local run.)"""
    from dtm_ray.results.export import export_run

    run_uri = model_store.uri("e2e/run")
    job = tiny_job(
        model_uri(model_store, "tiny"), run_uri, SHORT, UNIFORM_HALF,
        evaluate={"tasks": ["facts"], "limit": 4}, workers=2,
    )  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.monotonic()
    assert cli.main(["run", str(path)]) == 0, capsys.readouterr().err
    print(f"run: {time.monotonic() - started:.1f} s")
    err = capsys.readouterr().err
    base = run_uri.split("?", 1)[0]
    assert f"exported the compressed model to {run_uri.replace('/run?', '/run/export?')}" in err
    assert f"report: {base}/report/report.html" in err

    fs = model_store.filesystem()
    listed = {
        i.path.removeprefix("runs/e2e/run/")
        for i in fs.get_file_info(pafs.FileSelector("runs/e2e/run", recursive=True))
        if i.type == pafs.FileType.File
    }
    assert {"export/model.safetensors", "export/export.json", "report/report.html"} <= listed
    assert "final/tasks/data.parquet" in listed
    assert not any(name.startswith(".") or "/." in name for name in listed)  # no scratch left

    # show and report read the URI; export writes into it again (same files).
    assert cli.main(["show", run_uri]) == 0
    assert "final" in capsys.readouterr().out
    assert cli.main(["report", run_uri]) == 0
    assert capsys.readouterr().out.strip() == f"{base}/report/report.html"
    assert export_run(run_uri) == run_uri.replace("/run?", "/run/export?")

    local = model_store.download("e2e/run", tmp_path / "copy")
    again = Path(export_run(str(local), str(tmp_path / "local-export")))
    for name in ("model.safetensors", "sparsity_map.json", "config.json"):
        assert (local / "export" / name).read_bytes() == (again / name).read_bytes(), name

    run_info = json.loads((local / "run.json").read_text())
    assert run_info["model_source"]["kind"] == STORE
    actors = run_info["actors"][0]["actors"]
    assert sorted(a["model_fetched"] for a in actors) == [False, True]  # one fetch per node

    tasks = pd.read_parquet(local / "final" / "tasks")
    assert list(tasks["task"]) == ["dtm_facts_mc", "dtm_facts_cloze"]
    assert (tasks["examples"] == 4).all()
    # The lm-eval worker materialised the export from the store into its node's cache, beside
    # the driver's config-and-tokenizer copy of the model and the node's whole one.
    copies = [p for p in (node_cache / "models" / "sources").iterdir() if p.is_dir()]
    assert len(copies) == 3
    exported = (local / "export" / "model.safetensors").read_bytes()
    assert any(
        (p / "model.safetensors").is_file() and (p / "model.safetensors").read_bytes() == exported
        for p in copies
    )
