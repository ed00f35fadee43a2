import json

import pytest

from dtm_ray.engines import models
from dtm_ray.engines.sources import node_folder
from dtm_ray.errors import ConfigError


def test_smollm2_materializes_as_hf_folder(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert (smollm2_dir / "model.safetensors").stat().st_size > 100e6
    assert (smollm2_dir / "tokenizer.json").is_file()
    # Idempotent: a second call returns the same folder without converting again.
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime
    assert models.materialize("smollm2-135m") == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime == mtime


def test_cli_prints_the_path(smollm2_dir, capsys):
    assert models.main(["smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_unknown_model_is_a_clear_error(capsys):
    assert models.main(["llama-9000"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'llama-9000'" in err and "smollm2-135m" in err


def test_a_folder_or_a_known_name_is_its_own_node_folder(tmp_path, smollm2_dir):
    assert node_folder(str(smollm2_dir)) == smollm2_dir.resolve()
    assert node_folder("smollm2-135m") == smollm2_dir
    with pytest.raises(ConfigError, match="no config.json"):
        node_folder(str(tmp_path))
    with pytest.raises(ConfigError, match="neither a local folder"):
        node_folder("no-such-model")
