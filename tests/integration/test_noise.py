"""The noise floor on Ray: a resumed round reads its noise back, a normal run has one noiseless row
per actor per round, an actor that computes differently shows its noise. (The decisions alone:
tests/unit/test_noise.py.)"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from support.fakes import measured
from support.jobs import tiny_job

from dtm_ray.cluster.actor import EngineActor
from dtm_ray.core.state import ModelState, Reference
from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import load_job
from dtm_ray.loop import driver
from dtm_ray.loop.rounds import JobEngines, noise_floor
from dtm_ray.records.schemas import NOISE_SCHEMA
from dtm_ray.records.store import RunStore
from dtm_ray.results.show import load_run, rounds_table


class _Pool:
    def __init__(self, answers: list[dict]) -> None:
        self.answers, self.calls = answers, 0

    def broadcast(self, method: str, context) -> list[dict]:  # noqa: ANN001
        assert method == "null_probe"
        self.calls += 1
        return self.answers


class _Engines:
    def __init__(self, pool: _Pool) -> None:
        self.pool = pool


def _reference(prompts: int = 3, n_new: int = 4) -> Reference:
    tokens = np.zeros((prompts, n_new), dtype=np.int64)
    return Reference(np.zeros((prompts, 2), np.int64), tokens, tokens, np.ones_like(tokens, float))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_resumed_round_reads_its_noise_back_and_adds_no_rows(
    where, tmp_path: Path, ray_session, request
):
    uri = str(tmp_path / "run")
    if where == "s3":
        uri = request.getfixturevalue("s3_server").uri(f"noise-{tmp_path.name}")
    store = RunStore(uri)
    answers = [measured([4, 4, 4], [0, 0, 0], f"engine-{i}") for i in range(2)]
    engines = _Engines(_Pool(answers))
    expected = (np.full(3, 4), np.zeros(3))
    first = noise_floor(engines, store, 0, ModelState(), _reference(), expected)
    again = noise_floor(engines, store, 0, ModelState(), _reference(), expected)
    assert engines.pool.calls == 1  # the second call read the stored round
    assert first.equals(again) and again.num_rows == 2
    assert store.read_round_table("noise", NOISE_SCHEMA).num_rows == 2
    # A finished round from before this table: read only, no engine started.
    assert noise_floor(engines, store, 1, ModelState(), _reference(), expected, False) is None
    assert engines.pool.calls == 1


PERTURBED = "model.layers.1.mlp.down_proj.weight"


class PerturbedActor(EngineActor):
    """Engine actor 1 scores its null probe with one weight slightly off (as another GPU's
    kernels might round): a test-only fault, the weight put back afterwards."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.perturbed = self.worker.startswith("engine-1@")

    def null_probe(self, context):  # noqa: ANN001, ANN201
        if not self.perturbed:
            return super().null_probe(context)
        engine = self.session.engine
        weight = engine.original_weight(PERTURBED)
        engine.set_weights({PERTURBED: weight * 1.05})
        try:
            return super().null_probe(context)
        finally:
            engine.restore([PERTURBED])
            self.session._residuals = None  # the kept stream was the perturbed model's


def test_an_actor_that_computes_differently_shows_its_noise_and_the_others_none(
    ray_session, monkeypatch, tiny_llama_dir: Path, tmp_path: Path
):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(
        driver, "JobEngines", functools.partial(JobEngines, actor_class=PerturbedActor)
    )
    out = tmp_path / "run"
    job = tiny_job(tiny_llama_dir, out, probe={"components": [{"kinds": ["q"]}], "specs": ["int8"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    driver.run_checked_job(check_job(load_job(tmp_path / "job.yaml")), print_summary=False)

    tables = load_run(str(out))
    rows = {r["actor"]: r for r in tables.noise.to_dict("records")}
    assert sorted(rows) == [0, 1]
    clean, off = rows[0], rows[1]
    assert off["worker"].startswith("engine-1@")
    assert off["divergent_positions"] > 0 and off["short_prompts"] > 0 and off["min_fdt"] < 16
    assert off["noise_positions"] == off["divergent_positions"]
    assert (clean["divergent_positions"], clean["short_prompts"], clean["min_fdt"]) == (0, 0, 16)
    shown = rounds_table(tables)
    assert shown["actor_noise"].tolist() == [off["noise_positions"]]
    # Resumed: the round is done, nothing is measured again, no row is added.
    driver.run_checked_job(check_job(load_job(tmp_path / "job.yaml")), print_summary=False)
    assert RunStore(str(out)).read_round_table("noise", NOISE_SCHEMA).num_rows == 2
