"""A whole run with planted secrets: none reaches the run directory. (The redaction alone:
tests/unit/test_secrets.py.)"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from support.fakes import AWS_SECRET, DB_PASSWORD, HF_TOKEN
from support.jobs import SHORT, tiny_job

from dtm_ray.cluster.actor import EngineActor
from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import load_job
from dtm_ray.loop import driver
from dtm_ray.loop.rounds import JobEngines
from dtm_ray.records.store import RunStore
from dtm_ray.redact import MASK

PLANTED = (HF_TOKEN, AWS_SECRET, DB_PASSWORD)


LEAKY_COMPONENT = "model.layers.0.self_attn.q_proj.weight"


class LeakyActor(EngineActor):
    """An engine actor whose probe of one component fails with an error full of secrets (as a
    storage or hub client's message might be)."""

    def probe(self, delta, context):  # noqa: ANN001, ANN201
        if LEAKY_COMPONENT in delta:
            raise PermissionError(
                f"hub refused token {HF_TOKEN}; s3://b/k?secret_key={AWS_SECRET}; "
                f"https://alice:{DB_PASSWORD}@db.example/"
            )
        return super().probe(delta, context)


def _files_holding(folder: Path, secrets: tuple[str, ...]) -> list[str]:
    """Every file under `folder` whose bytes, or whose Parquet text cells, hold a secret."""
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        cells = ""
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            cells = json.dumps(table.to_pylist(), default=str)
        hits += [f"{path}: {s}" for s in secrets if s.encode() in data or s in cells]
    return hits


def test_no_planted_secret_reaches_the_run_directory(
    ray_session, secrets_in_env, monkeypatch, tiny_llama_dir: Path, tmp_path: Path, capfd
) -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(driver, "JobEngines", functools.partial(JobEngines, actor_class=LeakyActor))
    out = tmp_path / "run"
    probe = {"components": [{"kinds": ["q", "down"]}], "specs": ["int8"]}
    job = tiny_job(tiny_llama_dir, out, SHORT, probe=probe, max_probe_retries=0)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    driver.run_checked_job(check_job(load_job(tmp_path / "job.yaml")), print_summary=True)

    probes = {r["component"]: r for r in RunStore(str(out)).read_probes().to_pylist()}
    leaked = probes[LEAKY_COMPONENT]
    assert leaked["status"] == "failed"
    assert f"hub refused token {MASK}; s3://b/k?secret_key={MASK}" in leaked["error"]
    assert f"https://{MASK}@db.example/" in leaked["error"]
    assert (out / "report" / "report.md").is_file()  # the report was written, and searched
    assert _files_holding(out, PLANTED) == []
    printed = capfd.readouterr()
    assert not [s for s in PLANTED if s in printed.out + printed.err]
