"""Secrets never reach a run directory, a log or the terminal: planted in the environment, in an
error an engine raises and in what it prints, they are masked in everything dtm-ray writes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from support.fakes import AWS_SECRET, DB_PASSWORD, HF_TOKEN

from dtm_ray import cli
from dtm_ray.cluster.logs import EngineLog
from dtm_ray.records.store import RunStore
from dtm_ray.redact import MASK, redact, redact_data


# --- what is masked ------------------------------------------------------------------------------
def test_secret_environment_values_urls_and_query_keys_are_masked(secrets_in_env) -> None:
    text = (
        f"login with {HF_TOKEN}; s3://bucket/run?region=eu&secret_key={AWS_SECRET}&scheme=http "
        f"https://alice:{DB_PASSWORD}@db.example/x and https://db.example/x?token=abc123"
    )
    assert redact(text) == (
        f"login with {MASK}; s3://bucket/run?region=eu&secret_key={MASK}&scheme=http "
        f"https://{MASK}@db.example/x and https://db.example/x?token={MASK}"
    )


def test_settings_and_ordinary_text_are_left_alone(monkeypatch) -> None:
    # Short values of secret-named variables are settings (RAY_AUTH_MODE-like), not secrets.
    monkeypatch.setenv("SOME_TOKEN_MODE", "off")
    text = "model.layers.3.self_attn.q_proj.weight: magnitude:0.5 off, http://host:8265/api"
    assert redact(text) == text


def test_every_string_of_a_record_is_masked(secrets_in_env) -> None:
    data = {"model": "m", "hub": [f"https://u:{DB_PASSWORD}@h/", 3], "dtm": {"n": HF_TOKEN}}
    assert redact_data(data) == {"model": "m", "hub": [f"https://{MASK}@h/", 3], "dtm": {"n": MASK}}


def test_the_engine_log_masks_what_an_engine_prints(secrets_in_env, tmp_path, capsys) -> None:
    log = EngineLog(tmp_path / "engines.log", verbose=True)
    batch = {"pid": 7, "actor_name": "EngineActor", "lines": [f"loading with token {HF_TOKEN}"]}
    log.handle(batch)
    log.write([f"ray: connecting with {AWS_SECRET}"])
    log.close()
    written = (tmp_path / "engines.log").read_text()
    shown = capsys.readouterr().err
    assert written.splitlines() == [
        f"(EngineActor pid=7) loading with token {MASK}",
        f"ray: connecting with {MASK}",
    ]
    assert shown == f"(EngineActor pid=7) loading with token {MASK}\n"


def test_run_json_and_tables_written_by_the_store_are_masked(secrets_in_env, tmp_path) -> None:
    store = RunStore(str(tmp_path / "run"))
    store.write_json("run.json", {"config": {"out": f"s3://b/r?secret_key={AWS_SECRET}"}})
    table = pa.table({"round": [0], "error": [f"denied: {HF_TOKEN}"]})
    store.write_final("summary", table)
    assert AWS_SECRET not in (tmp_path / "run" / "run.json").read_text()
    stored = pq.read_table(tmp_path / "run" / "final" / "summary" / "data.parquet")
    assert stored.column("error").to_pylist() == [f"denied: {MASK}"]


def test_an_internal_error_and_its_traceback_file_are_masked(
    secrets_in_env, monkeypatch, tmp_path, capsys
) -> None:
    from dtm_ray.results import show

    def leaky(run_dir: str) -> None:
        raise RuntimeError(f"storage refused {AWS_SECRET}")

    monkeypatch.setattr(show, "load_run", leaky)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert cli.main(["show", "runs/x"]) == 1
    err = capsys.readouterr().err
    assert AWS_SECRET not in err and MASK in err
    (saved,) = tmp_path.glob("dtm-ray-traceback-*.txt")
    assert AWS_SECRET not in saved.read_text() and MASK in saved.read_text()


# --- a real run ----------------------------------------------------------------------------------
