"""`vlm data check` and the same checks in `vlm train`: one test per fatal finding, a clean report on good data."""

import dataclasses
import json
import re

import pytest
import yaml
from PIL import Image

from vlm.cli import main
from vlm.config import ProjectorConfig, VisionConfig, load_config
from vlm.data.check import data_processor, render
from vlm.model import VisionLanguageModel

# ChatML, except that each turn's <|im_end|> is written when the next turn starts: rendered one answer at a
# time, the end of an answer lands in the next prompt, and the last answer never gets one.
END_IN_NEXT_TURN = (
    "{% for message in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}<|im_end|>\n{% endif %}<|im_start|>assistant\n{% endif %}"
)
# A prompt-only template: it drops the assistant's messages, so answers never reach the labels.
NO_ANSWERS = (
    "{% for message in messages %}{% if message['role'] != 'assistant' %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """LLaVA JSON: caption records, conversations with a text-only one, and a record whose image is missing."""
    root = tmp_path_factory.mktemp("check")
    (root / "images").mkdir()
    captions, conversations = [], []
    for i, color in enumerate(["red", "green", "blue"] * 4):
        Image.new("RGB", (40, 40), color).save(root / "images" / f"{i}.png")
        captions.append({"image": f"images/{i}.png",
                         "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                           {"from": "gpt", "value": f"A {color} square."}]})
        conversations.append({"image": f"images/{i}.png",
                              "conversations": [{"from": "human", "value": "What color is it?\n<image>"},
                                                {"from": "gpt", "value": color}]})
    conversations.append({"conversations": [{"from": "human", "value": "What is the capital of France?"},
                                            {"from": "gpt", "value": "Paris."}]})
    conversations.append({"image": "images/none.png", "conversations": conversations[0]["conversations"]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.json").write_text(json.dumps(conversations))
    return root


def lm_with_template(tmp_path, tiny_lm_dir, template: str) -> str:
    """The tiny LM's tokenizer under another chat template: all `vlm data check` and a stopped `vlm train` load."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path / "lm")
    return str(tmp_path / "lm")


def write_config(tmp_path, tiny_model_config, data, lm: str | None = None, **data_overrides) -> str:
    stage = {"epochs": 1, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_ratio": 0.0}
    config = {
        "model": {"vision": {"backend": "hf", "name": tiny_model_config.vision.name},
                  "lm": {"name": lm or tiny_model_config.lm.name}},
        "data": {"align": {"kind": "llava", "path": str(data / "captions.json"), "image_root": str(data)},
                 "instruct": {"kind": "llava", "path": str(data / "instruct.json"), "image_root": str(data)},
                 "val_fraction": 0.1, "cache": "off", **data_overrides},
        "train": {"output_dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 100, "save_every": 100,
                  "align": dict(stage), "instruct": dict(stage)},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def check(capsys, *args):
    status = main(["data", "check", *args])
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


def test_good_data_passes_and_shows_the_supervised_answers_as_training_sees_them(
    tmp_path, tiny_model_config, data, capsys
):
    status, out, err = check(capsys, "--config", write_config(tmp_path, tiny_model_config, data))
    assert status == 0 and err == []
    # 32 px tiny CLIP, 8 px patches, CLS dropped: 16 image tokens; the answer and its <|im_end|> are supervised.
    assert "<|im_start|>user\n<image x16>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n[[A " in out
    assert " square.<|im_end|>\n]]" in out
    assert "end of turn: all 12 answers end with <|im_end|>" in out and "all 14 answers" in out
    assert "skipped by the source: none" in out
    assert "images: 12 of 12 opened, 0 did not" in out
    assert "images: 13 of 13 opened, 1 did not" in out and "none.png does not exist" in out
    assert "(1 of 14 text only)" in out


def test_the_steps_announced_are_the_steps_training_takes(tmp_path, tiny_model_config, data, capsys):
    config = write_config(tmp_path, tiny_model_config, data)
    _, out, _ = check(capsys, "--config", config, "--stage", "instruct")
    announced = int(re.search(r"optimizer steps: .*: (\d+) steps", out)[1])
    assert main(["train", "--config", config, "--stage", "instruct"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["instruct"]["steps"] == announced


def test_an_end_of_turn_token_never_supervised_stops_the_check_and_training_with_the_same_line(
    tmp_path, tiny_model_config, tiny_lm_dir, data, capsys, monkeypatch
):
    config = write_config(tmp_path, tiny_model_config, data, lm_with_template(tmp_path, tiny_lm_dir, END_IN_NEXT_TURN))
    status, out, err = check(capsys, "--config", config)
    assert status == 1
    assert "[[A red square.]]" in out  # the answer is supervised, its end is not
    line = "the end-of-turn token (<|im_end|>) is never supervised"
    assert [e.split(": ", 2)[1] for e in err if line in e] == ["data.align", "data.instruct"]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(VisionLanguageModel, "from_config", no_model)
    assert main(["train", "--config", config]) == 2
    _, train_err = capsys.readouterr()
    assert [e.removeprefix("vlm train: ") for e in train_err.splitlines()] == [
        e.removeprefix("vlm data check: ") for e in err]


def test_a_record_class_without_supervised_tokens_is_fatal(tmp_path, tiny_model_config, tiny_lm_dir, data, capsys):
    config = write_config(tmp_path, tiny_model_config, data, lm_with_template(tmp_path, tiny_lm_dir, NO_ANSWERS))
    status, _, err = check(capsys, "--config", config, "--stage", "instruct")
    assert status == 1
    assert any("none of the 13 sampled records with an image has a supervised token" in e for e in err)
    assert any("none of the 1 sampled records text only has a supervised token" in e for e in err)


def test_answers_truncated_away_are_fatal(tmp_path, tiny_model_config, data, capsys):
    # 22 tokens hold the prompt's start and the 16 image tokens, not the question after them nor the answer.
    status, out, err = check(capsys, "--config", write_config(tmp_path, tiny_model_config, data, max_length=22),
                             "--stage", "align")
    assert status == 1
    (line,) = err
    assert "data.align: data.max_length=22 leaves 12 of 12 sampled records (100.0%) without an answer token" in line
    assert "no answer tokens within max_length" in out
    assert check(capsys, "--config", write_config(tmp_path, tiny_model_config, data, max_length=64),
                 "--stage", "align")[0] == 0


@pytest.mark.parametrize("vision, projector", [
    ({"backend": "hf"}, ProjectorConfig()),
    ({"backend": "hf", "drop_cls": False}, ProjectorConfig()),
    ({"backend": "hf"}, ProjectorConfig(compress="pool", num_tokens=4)),
    ({"backend": "hf"}, ProjectorConfig(compress="pixel_shuffle", factor=2)),
    ({"backend": "open_clip"}, ProjectorConfig()),
    ({"backend": "open_clip", "drop_cls": False}, ProjectorConfig()),
    pytest.param({"backend": "efficientnet", "name": "efficientnet-lite0", "image_size": 128}, ProjectorConfig(),
                 marks=pytest.mark.integration),
])
def test_image_tokens_without_the_tower_are_the_loaded_models(tiny_model_config, tiny_open_clip, vision, projector):
    names = {"hf": {"name": tiny_model_config.vision.name},
             "open_clip": {"name": tiny_open_clip[0], "pretrained": tiny_open_clip[1]}}
    vision_config = VisionConfig(**{**names.get(vision["backend"], {}), **vision})
    model_config = dataclasses.replace(tiny_model_config, vision=vision_config, projector=projector)
    config = dataclasses.replace(load_config(), model=model_config)
    processor, stops = data_processor(config)
    assert processor.num_image_tokens == VisionLanguageModel.from_config(model_config).processor.num_image_tokens
    assert processor.tokenizer.convert_ids_to_tokens(sorted(stops)) == ["<|im_end|>"]


def test_on_a_terminal_supervised_tokens_are_green_and_image_tokens_compact(tiny_model_config):
    processor, _ = data_processor(dataclasses.replace(load_config(), model=tiny_model_config))
    encoded = processor.encode([{"role": "user", "content": "<image>\nWhat color?"},
                                {"role": "assistant", "content": "red"}])
    text = render(encoded.input_ids, encoded.labels, processor, color=True)
    prompt = "<|im_start|>user\n<image x16>\nWhat color?<|im_end|>\n<|im_start|>assistant\n"
    assert text == prompt + "\x1b[32mred<|im_end|>\n\x1b[0m"
