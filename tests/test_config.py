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


def _option_sets(cls=None, prefix=""):
    """Every field declared as a Literal option set, with its valid values, found by walking the config."""
    import dataclasses
    import typing

    from vlm.config import Config

    cls = cls or Config
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _option_sets(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is typing.Literal:
            yield f"{prefix}{f.name}", typing.get_args(tp)


OPTION_SETS = list(_option_sets())


def test_the_option_sets_are_declared():
    keys = {key for key, _ in OPTION_SETS}
    assert {"model.vision.backend", "model.projector.type", "model.projector.compress", "model.projector.norm",
            "model.lm.dtype", "data.align.kind", "train.instruct.train_lm", "train.stage",
            "train.mixed_precision"} <= keys


@pytest.mark.parametrize("key, valid", OPTION_SETS, ids=[key for key, _ in OPTION_SETS])
def test_a_bad_option_stops_before_any_model_loads(key, valid, monkeypatch, capsys):
    from vlm.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the bad option was reported")

    for loader in ("vlm.model.build_vision_encoder", "vlm.model.load_language_model",
                   "vlm.model.VisionLanguageModel.from_config"):
        monkeypatch.setattr(loader, no_loading)
    typo = valid[0][:-1] + "x"
    assert main(["train", "--config", "offline", f"{key}={typo}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and all(v in err for v in valid)
    assert f"did you mean {valid[0]!r}" in err


def test_a_folder_named_by_a_number_is_a_path():
    assert load_config("offline", ["train.output_dir=2024"]).train.output_dir == "2024"


def test_on_and_off_are_options_not_booleans():
    assert load_config("offline", ["data.cache=on"]).data.cache == "on"
    assert load_config("offline", ["data.cache=off"]).data.cache == "off"


@pytest.mark.parametrize("override, message", [
    ("data.augment.views=-2", r"data.augment.views=-2 is out of range; use a value at least 0"),
    ("data.augment.color=0.5", r"data.augment.color=0.5 is out of range; use a value from 0 to 0.2"),
    ("data.augment.rotate=270", r"data.augment.rotate=270.0 is out of range; use a value from 0 to 180"),
    ("data.augment.upscale=0.5", r"data.augment.upscale=0.5 is out of range; use a value from 1 to 8"),
    ("data.augment.views=four", r"data.augment.views must be int, got 'four'"),
    ("data.augment.rotation=90", r"did you mean 'data.augment.rotate'"),
])
def test_augmentation_settings_out_of_range_stop_with_the_key_and_the_range(override, message):
    assert load_config("offline").data.augment.views == 0  # off unless asked for
    with pytest.raises(ConfigError, match=message):
        load_config("offline", [override])


@pytest.mark.parametrize("size", [-5, 8])
def test_an_input_size_below_the_towers_stride_stops_with_the_key_and_the_fix(size):
    assert load_config("offline", ["model.vision.image_size=32"]).model.vision.image_size == 32
    assert load_config("offline", ["model.vision.image_size=0"]).model.vision.image_size == 0
    with pytest.raises(ConfigError, match=rf"model.vision.image_size={size} is too small; use 0 .* or at least 32"):
        load_config("offline", [f"model.vision.image_size={size}"])
