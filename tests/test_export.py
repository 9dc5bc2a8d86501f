import sys

import huggingface_hub.constants
import pytest
import torch
from conftest import save_tiny_tower

from vlm.cli import main
from vlm.config import ConfigError, LMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlm.export import export_llava
from vlm.model import VisionLanguageModel

QUESTION = "what shape is in the image?"


@pytest.fixture(scope="module")
def tiny_siglip_dir(tmp_path_factory):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    return save_tiny_tower(tmp_path_factory.mktemp("tiny_siglip"), SiglipVisionModel, SiglipVisionConfig, processor)


@pytest.fixture(scope="module")
def tied_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny LM with its output head tied to its input embeddings, as SmolLM2 has."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_tied_lm")
    config = AutoConfig.from_pretrained(tiny_lm_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(path)
    return path


def checkpoint(config: ModelConfig, path, lm_weights: str = "none", lora_targets="all-linear"):
    """A saved vlm checkpoint whose projector is far from its init, so the image drives the output.

    lm_weights="lora" wraps the LM in a LoRA adapter as `vlm train` does (train_lm=lora) and "full" trains
    the whole LM (train_lm=full); either way the LM's change is random and large enough to move the logits.
    """
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.normal_(0, 1)
        if lm_weights == "lora":
            from peft import LoraConfig, get_peft_model

            model.lm = get_peft_model(model.lm, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets,
                                                           task_type="CAUSAL_LM"))
            for name, p in model.lm.named_parameters():
                if "lora_B" in name:  # a fresh LoRA B is zero: the adapter would change nothing, merged or not
                    p.normal_(0, 0.2)
        elif lm_weights == "full":
            model.lm.requires_grad_(True)  # what train_lm=full leaves; save_pretrained writes the LM to lm/
            for p in model.lm.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
    model.save_pretrained(path)
    return model


def load_offline(out, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any Hub request raises
    with monkeypatch.context() as no_peft:  # plain transformers: any import of peft while loading raises
        for name in [name for name in sys.modules if name == "peft" or name.startswith("peft.")]:
            no_peft.setitem(sys.modules, name, None)
        llava = AutoModelForImageTextToText.from_pretrained(out)
    return llava, AutoProcessor.from_pretrained(out)


def exported_inputs(processor, image):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("vision, projector, drop_cls, lm", [
    ("clip", "mlp2x_gelu", True, "untied"),
    ("clip", "linear", False, "untied"),
    ("siglip", "mlp2x_gelu", True, "tied"),
])
def test_exported_llava_matches_vlm(vision, projector, drop_cls, lm, request, images, tmp_path, monkeypatch):
    vision_dir = request.getfixturevalue("tiny_clip_dir" if vision == "clip" else "tiny_siglip_dir")
    lm_dir = request.getfixturevalue("tiny_lm_dir" if lm == "untied" else "tied_lm_dir")
    config = ModelConfig(vision=VisionConfig(backend="hf", name=str(vision_dir), drop_cls=drop_cls),
                         projector=ProjectorConfig(type=projector), lm=LMConfig(name=str(lm_dir)))
    assert_export_matches(config, images, tmp_path, monkeypatch)


@pytest.mark.parametrize("lm_weights, lm", [("lora", "untied"), ("lora", "tied"), ("full", "untied"), ("full", "tied")])
def test_exported_llava_carries_the_trained_lm(lm_weights, lm, request, tiny_clip_dir, images, tmp_path, monkeypatch):
    """Stage 2 trained the LM too: LoRA merged into the LM's weights, or the fine-tuned LM from lm/."""
    lm_dir = request.getfixturevalue("tiny_lm_dir" if lm == "untied" else "tied_lm_dir")
    config = ModelConfig(vision=VisionConfig(backend="hf", name=str(tiny_clip_dir)), lm=LMConfig(name=str(lm_dir)))
    assert_export_matches(config, images, tmp_path, monkeypatch, lm_weights)
    assert not [p.name for p in (tmp_path / "out").iterdir() if "adapter" in p.name or p.name in ("lora", "lm")]


@pytest.mark.parametrize("system_prompt", ["", 'be "brief"\nand exact'])
def test_exported_llava_prompts_with_the_system_prompt_vlm_trained_with(system_prompt, tiny_clip_dir, tiny_lm_dir,
                                                                        images, tmp_path, monkeypatch):
    config = ModelConfig(vision=VisionConfig(backend="hf", name=str(tiny_clip_dir)),
                         lm=LMConfig(name=str(tiny_lm_dir), system_prompt=system_prompt))
    assert_export_matches(config, images, tmp_path, monkeypatch)


@pytest.mark.integration
def test_export_with_the_packaged_lm_matches_vlm(tiny_clip_dir, images, tmp_path, monkeypatch):
    """The real SmolLM2: tied head, 49k vocabulary, a chat template that adds a default system turn."""
    config = ModelConfig(vision=VisionConfig(backend="hf", name=str(tiny_clip_dir)),
                         lm=LMConfig(name="packaged:smollm2-135m-instruct"))
    assert_export_matches(config, images, tmp_path, monkeypatch)


def assert_export_matches(config: ModelConfig, images, tmp_path, monkeypatch, lm_weights: str = "none"):
    """Same prompt ids, pixels, logits and greedy tokens from vlm (as `vlm chat` loads the checkpoint)
    and from the exported LLaVA folder."""
    checkpoint(config, tmp_path / "ckpt", lm_weights)
    export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    model = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    llava, processor = load_offline(tmp_path / "out", monkeypatch)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    assert not [m for m in llava.modules() if type(m).__module__.startswith("peft")]
    assert not [k for k in llava.state_dict() if "lora" in k]
    tied = model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight
    assert (llava.get_output_embeddings().weight is llava.get_input_embeddings().weight) == tied

    ours = model.prepare([images[0]], [[{"role": "user", "content": QUESTION}]])
    theirs = exported_inputs(processor, images[0])
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"])

    vocab = model.lm.config.vocab_size
    with torch.no_grad():
        expected = model(**ours).logits
        logits = llava(**theirs).logits
        other_image = llava(**exported_inputs(processor, images[1])).logits
    torch.testing.assert_close(logits[..., :vocab], expected)
    assert not torch.allclose(other_image, logits, atol=1e-3)  # the image reaches the output
    if lm_weights != "none":  # the trained LM reaches the output: the checkpoint's projector on the base LM differs
        base = VisionLanguageModel.from_config(config)
        base.load_projector(tmp_path / "ckpt")
        with torch.no_grad():
            assert not torch.allclose(base(**ours).logits, logits[..., :vocab], atol=1e-3)

    generated = llava.generate(**theirs, max_new_tokens=12, do_sample=False)[:, theirs["input_ids"].shape[1]:]
    assert generated.tolist() == model.generate(**ours, max_new_tokens=12).tolist()
    assert processor.batch_decode(generated, skip_special_tokens=True)[0].strip() == \
        model.chat([images[0]], [[{"role": "user", "content": QUESTION}]], max_new_tokens=12)[0]


def test_exported_model_never_generates_the_image_token(tiny_model_config, tmp_path, monkeypatch):
    checkpoint(tiny_model_config, tmp_path / "ckpt")
    export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    llava, processor = load_offline(tmp_path / "out", monkeypatch)
    image_token_id = llava.config.image_token_id
    prompt = processor.tokenizer("what shape", return_tensors="pt")
    with torch.no_grad():  # point the image token's output row at the final hidden state: logit 100, the argmax
        hidden = llava.model(**prompt).last_hidden_state[0, -1]
        llava.lm_head.weight[image_token_id] = 100 * hidden / hidden.square().sum()
    generated = llava.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert image_token_id not in generated[0, prompt["input_ids"].shape[1]:].tolist()
    unsuppressed = llava.generate(**prompt, max_new_tokens=1, do_sample=False, suppress_tokens=None)
    assert unsuppressed[0, -1] == image_token_id


@pytest.mark.parametrize("short_answer_prompt", ["", "One word."])
def test_export_says_how_training_asked_short_answer_questions(short_answer_prompt, tiny_model_config, tmp_path,
                                                                capsys):
    import dataclasses

    lm = dataclasses.replace(tiny_model_config.lm, short_answer_prompt=short_answer_prompt)
    checkpoint(dataclasses.replace(tiny_model_config, lm=lm), tmp_path / "ckpt")
    export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    note = capsys.readouterr().err
    assert "model.lm.short_answer_prompt" in note
    assert ("alone" in note) == (short_answer_prompt == "") and ("One word." in note) == bool(short_answer_prompt)
    checkpoint(tiny_model_config, tmp_path / "llava-asked")  # LLaVA's instruction: nothing to say
    export_llava(str(tmp_path / "llava-asked"), str(tmp_path / "out2"))
    assert "short_answer_prompt" not in capsys.readouterr().err


def test_export_replaces_an_earlier_export_but_not_other_folders(tiny_model_config, tmp_path):
    checkpoint(tiny_model_config, tmp_path / "ckpt")
    export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier LLaVA export"):
        export_llava(str(tmp_path / "ckpt"), str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_open_clip_tower_is_refused_with_the_reason(tiny_open_clip, tiny_lm_dir, tmp_path, capsys):
    name, weights = tiny_open_clip
    checkpoint(ModelConfig(vision=VisionConfig(backend="open_clip", name=name, pretrained=weights),
                           lm=LMConfig(name=str(tiny_lm_dir))), tmp_path / "ckpt")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "open_clip" in err and "CLIP/SigLIP" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("projector, reason", [
    (ProjectorConfig(compress="pool", num_tokens=4), "compress=pool"),
    (ProjectorConfig(norm="layernorm"), "norm=layernorm"),
])
def test_projector_llava_cannot_express_is_refused_with_the_reason(tiny_model_config, tmp_path, projector, reason):
    config = ModelConfig(vision=tiny_model_config.vision, lm=tiny_model_config.lm, projector=projector)
    checkpoint(config, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=reason):
        export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))


def test_lora_on_a_tied_lm_head_is_refused(tied_lm_dir, tiny_clip_dir, tmp_path):
    """Merged into the one matrix a tied LM shares, an adapter on its head would change its input embeddings too."""
    config = ModelConfig(vision=VisionConfig(backend="hf", name=str(tiny_clip_dir)), lm=LMConfig(name=str(tied_lm_dir)))
    checkpoint(config, tmp_path / "ckpt", "lora", lora_targets=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="LM head of an LM whose input and output embeddings are one shared matrix"):
        export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_lm_with_scaled_logits_is_refused(tiny_lm_dir, tiny_clip_dir, tmp_path):
    """Granite divides its logits by `logits_scaling` in its own head; LLaVA's plain head would not."""
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    lm = GraniteForCausalLM(GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          logits_scaling=8.0))
    lm.save_pretrained(tmp_path / "granite")
    tokenizer.save_pretrained(tmp_path / "granite")
    checkpoint(ModelConfig(vision=VisionConfig(backend="hf", name=str(tiny_clip_dir)),
                           lm=LMConfig(name=str(tmp_path / "granite"))), tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="logit scaling or softcapping"):
        export_llava(str(tmp_path / "ckpt"), str(tmp_path / "out"))
