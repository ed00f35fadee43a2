"""The noise floor per engine actor (`noise/`) and batch invariance (`engine_options.
batch_invariant`): the decision as a pure function, the job checks, the table on local and s3://
run dirs and on resume, and real runs where the noise is 0 and where one actor is made to differ.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.fakes import measured

from dtm_ray.engines.config import (
    EngineConfig,
    describe_batch_invariance,
    resolve_batch_invariant,
)
from dtm_ray.errors import ConfigError
from dtm_ray.job.spec import JobConfig, check_fields
from dtm_ray.records.schemas import NOISE_SCHEMA, noise_table


# --- batch invariance: the decision ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("engine", "device", "capability", "on"),
    [
        ("vllm", "cuda", (8, 0), True),  # A100
        ("vllm", "cuda", (8, 6), True),  # A10G, RTX 30xx
        ("vllm", "cuda", (8, 9), True),  # L4, L40S
        ("vllm", "cuda", (9, 0), True),  # H100, H200
        ("vllm", "cuda", (10, 0), True),  # B200
        ("vllm", "cuda", (7, 5), False),  # T4
        ("vllm", "cuda", (7, 0), False),  # V100
        ("vllm", "cuda", None, False),
        ("vllm", "cpu", None, False),
        ("vllm", "rocm", None, False),
        ("vllm", "xpu", None, False),
        ("hf", "cuda", (9, 0), False),
        ("hf", "cpu", None, False),
    ],
)
def test_batch_invariance_is_on_by_default_exactly_where_vllm_can_run_it(
    engine, device, capability, on
):
    assert resolve_batch_invariant(None, engine, device, capability) is on
    assert resolve_batch_invariant(False, engine, device, capability) is False
    if on:
        assert resolve_batch_invariant(True, engine, device, capability) is True
    else:
        with pytest.raises(ValueError, match=r"^engine_options.batch_invariant: true") as err:
            resolve_batch_invariant(True, engine, device, capability)
        assert "\n" not in str(err.value)


def test_true_on_an_old_gpu_names_the_value_and_why():
    with pytest.raises(ValueError) as err:
        resolve_batch_invariant(True, "vllm", "cuda", (7, 5))
    assert "compute capability >= 8.0" in str(err.value) and "has 7.5" in str(err.value)


def test_engine_config_takes_only_a_bool_or_null():
    assert EngineConfig(batch_invariant=None).batch_invariant is None
    assert EngineConfig(batch_invariant=False).batch_invariant is False
    for bad in ("yes", 1, 0):
        with pytest.raises(ValueError, match="batch_invariant must be true, false or null"):
            EngineConfig(batch_invariant=bad)


def _job(engine: str, gpus: float, setting) -> JobConfig:  # noqa: ANN001
    resources = {"GPU": gpus} if gpus else {"CPU": 1}
    options = {} if setting is None else {"batch_invariant": setting}
    return JobConfig(
        model="x", engine=engine, engine_options=options, resources_per_worker=resources
    )


def test_the_job_refuses_true_where_no_actor_can_run_it_before_ray():
    with pytest.raises(ConfigError, match="the hf engine has no batch-invariant mode"):
        check_fields(_job("hf", 1, True))
    with pytest.raises(ConfigError, match="gives the actors no GPU"):
        check_fields(_job("vllm", 0, True))
    with pytest.raises(ConfigError, match="must be true, false or null"):
        check_fields(_job("vllm", 1, "on"))
    for fine in (_job("vllm", 1, True), _job("vllm", 0, False), _job("hf", 0, None)):
        check_fields(fine)  # a GPU's capability is checked where its engine starts


def test_the_plan_states_batch_invariance():
    assert "off (the engine actors run on CPU" in describe_batch_invariance(None, "vllm", 0)
    assert "off (the hf engine" in describe_batch_invariance(None, "hf", 1)
    assert "off (engine_options.batch_invariant: false)" in describe_batch_invariance(
        False, "vllm", 1
    )
    assert "on where the actors' GPUs are NVIDIA" in describe_batch_invariance(None, "vllm", 1)
    assert describe_batch_invariance(True, "vllm", 1).startswith("batch invariance: on (")


def test_the_vllm_engine_decides_before_vllm_starts_and_sets_the_environment(
    tiny_llama_dir: Path, monkeypatch
):
    """The actor-side check, without a GPU: the engine sees the device vLLM would run on."""
    from dtm_ray.engines import vllm as vllm_module
    from dtm_ray.engines import vllm_setup

    class Built(Exception):
        pass

    def build(self, kwargs):  # noqa: ANN001, ANN202
        raise Built(os.environ["VLLM_BATCH_INVARIANT"])

    monkeypatch.setattr(vllm_module.VLLMEngine, "_build", build)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    monkeypatch.setattr(vllm_setup, "on_cpu", lambda: False)
    for device, setting, env in [
        (("cuda", (9, 0)), None, "1"),
        (("cuda", (9, 0)), False, "0"),
        (("cuda", (7, 0)), None, "0"),
    ]:
        monkeypatch.setattr(vllm_setup, "device", lambda d=device: d)
        with pytest.raises(Built, match=f"^{env}$"):
            vllm_module.VLLMEngine(tiny_llama_dir, batch_invariant=setting)
    monkeypatch.setattr(vllm_setup, "device", lambda: ("cuda", (7, 0)))
    with pytest.raises(ValueError, match="needs compute capability >= 8.0 and this GPU has 7.0"):
        vllm_module.VLLMEngine(tiny_llama_dir, batch_invariant=True)
    # What vLLM itself reports on this machine: its CPU build, so off (the CPU path as before).
    monkeypatch.undo()
    assert vllm_setup.device() == ("cpu", None)
    assert resolve_batch_invariant(None, "vllm", *vllm_setup.device()) is False


# --- the table ----------------------------------------------------------------------------------


def test_noise_rows_against_the_models_own_reference_and_the_dense_one():
    own = noise_table(
        3, [measured([4, 4, 4], [0, 0, 0], "a"), measured([4, 1, 2], [0, 2, 1], "b")],
        4, [4, 4, 4], [0, 0, 0],
    )  # fmt: skip
    assert own.schema == NOISE_SCHEMA
    a, b = own.to_pylist()
    assert (a["actor"], a["short_prompts"], a["divergent_positions"], a["noise_positions"]) == (
        0, 0, 0, 0,
    )  # fmt: skip
    assert (b["short_prompts"], b["divergent_positions"], b["min_fdt"]) == (2, 3, 1)
    assert (b["noise_prompts"], b["noise_positions"]) == (2, 3)
    # Against the dense reference the model's own damage is expected; only departures count.
    dense = noise_table(
        1, [measured([2, 4, 0], [1, 0, 3], "a"), measured([2, 4, 1], [1, 0, 2], "b")],
        4, [2, 4, 0], [1, 0, 3],
    )  # fmt: skip
    a, b = dense.to_pylist()
    assert (a["short_prompts"], a["expected_positions"], a["noise_positions"]) == (2, 4, 0)
    assert (b["noise_prompts"], b["noise_positions"]) == (1, 1)


# --- real runs ------------------------------------------------------------------------------------
