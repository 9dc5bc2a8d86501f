import pytest

from vlm.config import ConfigError, load_config, preset_names


def test_presets_load_and_overrides_apply():
    assert {"offline", "clip-b16-smollm2-360m", "clip-l336-qwen2.5-0.5b"} <= set(preset_names())
    config = load_config("offline", ["train.seed=7", "model.projector.type=linear", "train.align.lr=0.01"])
    assert config.train.seed == 7 and config.model.projector.type == "linear" and config.train.align.lr == 0.01
    assert load_config("clip-l336-qwen2.5-0.5b").model.vision.name == "openai/clip-vit-large-patch14-336"


def test_scientific_notation_without_a_dot_is_a_float():
    assert load_config("offline", ["train.align.lr=1e-3"]).train.align.lr == 0.001


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"'model.projector.typ'.*did you mean 'model.projector.type'"):
        load_config("offline", ["model.projector.typ=linear"])


def test_wrong_type_names_key_and_fix():
    with pytest.raises(ConfigError, match=r"train.seed must be int, got 'abc'.*train.seed=1"):
        load_config("offline", ["train.seed=abc"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="offline"):
        load_config("nope")


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
