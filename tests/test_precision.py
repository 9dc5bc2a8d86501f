"""`auto` precision follows the machine: bf16 only where it computes natively, so no CPU gets the slow path."""

import dataclasses

import pytest
import torch

from vlm import precision
from vlm.config import load_config
from vlm.language_model import lm_dtype
from vlm.model import VisionLanguageModel, cast_lm_weights, to_accelerator
from vlm.train.trainer import _precision, warn_if_bf16_is_slow


@pytest.fixture(params=[False, True], ids=["cpu without bf16", "cpu with bf16"])
def cpu_bf16(request, monkeypatch):
    """This process sees a CPU (no GPU) whose bf16 instructions are as the parameter says."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: request.param)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return request.param


def test_auto_computes_in_bf16_only_on_a_cpu_with_bf16_instructions(cpu_bf16):
    assert precision.bf16_is_fast() is cpu_bf16
    assert _precision("auto") == ("bf16" if cpu_bf16 else "no")
    assert lm_dtype("auto") == (torch.bfloat16 if cpu_bf16 else torch.float32)
    assert (_precision("bf16"), _precision("no"), lm_dtype("bfloat16")) == ("bf16", "no", torch.bfloat16)  # as asked


def test_amx_alone_counts_as_bf16_instructions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.bf16_is_fast()


def test_explicit_bf16_on_a_cpu_without_it_is_warned_about(cpu_bf16, capsys):
    config = load_config("offline", ["train.mixed_precision=bf16", "model.lm.dtype=bfloat16"])
    warn_if_bf16_is_slow(config)
    err = capsys.readouterr().err
    if cpu_bf16:
        assert err == ""
    else:
        assert "train.mixed_precision=bf16 asks for bf16" in err and "model.lm.dtype=bfloat16 asks for bf16" in err
        assert "use `auto`" in err
    warn_if_bf16_is_slow(load_config("offline"))  # the preset says auto: never a warning
    assert capsys.readouterr().err == ""


def test_mixed_precision_no_survives_yaml_reading_it_as_false():
    assert load_config("offline", ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_inference_on_a_cpu_without_bf16_computes_a_bf16_checkpoints_lm_in_float32(cpu_bf16, tiny_model_config):
    config = dataclasses.replace(tiny_model_config, lm=dataclasses.replace(tiny_model_config.lm, dtype="bfloat16"))
    model = VisionLanguageModel.from_config(config)
    assert model.lm.dtype == torch.bfloat16  # as the checkpoint's config asks
    to_accelerator(model)
    assert model.lm.dtype == (torch.bfloat16 if cpu_bf16 else torch.float32)
    cast_lm_weights(model.lm, torch.float32)
    to_accelerator(model)
    assert model.lm.dtype == torch.float32  # float32 weights stay as loaded either way
