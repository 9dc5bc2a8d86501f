"""Tiny randomly initialised backbones, built offline inside the tests, saved where the real
loading code (from_pretrained on a local directory, open_clip by name + checkpoint file) reads them."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def cpu_without_bf16():
    """`auto` precision computes float32 in every test, whatever the CPU running the suite: with bf16 autocast
    (CPUs with AVX512-BF16 or AMX) losses that tests compare across runs, such as a stage's last held-out loss and
    the next stage's first, differ in the sixth digit. tests/test_precision.py covers both kinds of CPU."""
    from vlm.precision import CPU_BF16_CHECKS

    with pytest.MonkeyPatch.context() as patch:
        for check in CPU_BF16_CHECKS:
            patch.setattr(torch.cpu, check, lambda: False)
        yield


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.testing import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("tiny_lm")
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_tower(path, model_class, config_class, processor):
    """A 3-layer, 24-wide vision tower on 32 px images (4x4 patches of 8 px) with its image processor."""
    torch.manual_seed(0)
    tower = model_class(config_class(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, image_size=32, patch_size=8))
    tower.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return save_tiny_tower(tmp_path_factory.mktemp("tiny_clip"), CLIPVisionModel, CLIPVisionConfig, processor)


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """A registered tiny open_clip model name and a safetensors checkpoint of its weights."""
    import open_clip
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny_open_clip")
    name = "vlm-test-tiny-vit"
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    checkpoint = path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
    return name, str(checkpoint)


@pytest.fixture(scope="session")
def tiny_model_config(tiny_lm_dir, tiny_clip_dir):
    from vlm.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig

    return ModelConfig(vision=VisionConfig(backend="hf", name=str(tiny_clip_dir)),
                       projector=ProjectorConfig(type="mlp2x_gelu"),
                       lm=LMConfig(name=str(tiny_lm_dir)))


@pytest.fixture(scope="module")
def checkpoint(tiny_model_config, tmp_path_factory):
    """A checkpoint folder of the tiny model with an untrained projector, as `vlm train` writes one."""
    from vlm.model import VisionLanguageModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "final"
    VisionLanguageModel.from_config(tiny_model_config).save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tiny_model_config):
    from vlm.model import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(tiny_model_config)


@pytest.fixture(scope="session")
def images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 255, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(4)
    ]


@pytest.fixture(scope="session")
def benchmark_data(tmp_path_factory):
    """Tiny offline copies of the benchmark datasets in their Hub layout ({name: folder})."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parent / "fixtures" / "benchmarks" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def demo_model(tiny_model_config):
    from vlm.model import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(tiny_model_config)


@pytest.fixture(scope="module")
def demo_url(demo_model):
    """The demo app on a tiny random model, served on a free loopback port for a test module."""
    from demo_server import CHECKPOINT_LABEL, free_port

    from vlm.demo.app import build_app

    app = build_app(demo_model, CHECKPOINT_LABEL)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()
