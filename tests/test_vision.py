import dataclasses

import pytest
import torch

from vlm.config import ConfigError, VisionConfig
from vlm.vision import build_vision_encoder


def test_hf_clip_features_come_from_the_chosen_layer_without_cls(tiny_clip_dir, images):
    encoder = build_vision_encoder(VisionConfig(backend="hf", name=str(tiny_clip_dir), feature_layer=-2))
    pixels = encoder.preprocess(images[:2])
    features = encoder(pixels)
    hidden = encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert features.shape == (2, 16, 24)  # 32 px / 8 px patches = 4x4, CLS dropped
    assert torch.equal(features, hidden[-2][:, 1:])
    with_cls = build_vision_encoder(VisionConfig(backend="hf", name=str(tiny_clip_dir), drop_cls=False))
    assert with_cls.num_patches == 17


def test_open_clip_loads_local_checkpoint_and_selects_block(tiny_open_clip, images):
    import open_clip

    name, weights = tiny_open_clip
    encoder = build_vision_encoder(VisionConfig(backend="open_clip", name=name, pretrained=weights, feature_layer=-1))
    reference = open_clip.create_model(name, pretrained=weights).visual.eval()
    pixels = encoder.preprocess(images[:2])
    features = encoder(pixels)
    # Reference: run the tower's blocks by hand; the last block's output, before ln_post, CLS dropped.
    with torch.no_grad():
        x = reference.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([reference.class_embedding.expand(2, 1, -1), x], dim=1) + reference.positional_embedding
        x = reference.transformer(reference.ln_pre(x))
    assert features.shape == (2, 16, 32)
    torch.testing.assert_close(features, x[:, 1:])
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("layer", [-4, 4])
def test_open_clip_layer_out_of_range_is_a_config_error(tiny_open_clip, layer):
    name, weights = tiny_open_clip
    with pytest.raises(ConfigError, match="feature_layer"):
        build_vision_encoder(VisionConfig(backend="open_clip", name=name, pretrained=weights, feature_layer=layer))


def test_unknown_backend_lists_the_choices():
    from vlm.config import load_config

    with pytest.raises(ConfigError, match="open_clip"):
        load_config("offline", ["model.vision.backend=timm"])


def test_encoder_stays_frozen_in_train_mode(tiny_clip_dir):
    encoder = build_vision_encoder(VisionConfig(backend="hf", name=str(tiny_clip_dir)))
    encoder.train()
    assert not encoder.training and not encoder.tower.training


def test_misspelt_efficientnet_name_is_named_not_reported_as_a_missing_package():
    # The name decides which pip package holds the weights; a misspelling must not send the user to install one.
    with pytest.raises(ConfigError, match="is not an EfficientNet-Lite name") as error:
        build_vision_encoder(VisionConfig(backend="efficientnet", name="efficientnet-lite9"))
    assert "pip install" not in str(error.value)


@pytest.fixture(scope="module")
def random_efficientnet(tmp_path_factory):
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("efficientnet") / "lite0.pth"
    torch.save(EfficientNet.from_name("efficientnet-lite0").state_dict(), path)
    return str(path)


def test_last_block_features_add_the_last_blocks_output_beside_the_heads(random_efficientnet, images):
    config = VisionConfig(backend="efficientnet", name="efficientnet-lite0", pretrained=random_efficientnet,
                          image_size=64)
    head_only = build_vision_encoder(config)
    both = build_vision_encoder(dataclasses.replace(config, last_block_features=True))
    caught = {}
    both.tower._blocks[-1].register_forward_hook(lambda module, inputs, output: caught.update(block=output))
    pixels = head_only.preprocess(images[:2])
    features = both(pixels)

    width = head_only.hidden_size
    assert both.hidden_size == width + caught["block"].shape[1]
    assert both.num_patches == head_only.num_patches
    torch.testing.assert_close(features[..., :width], head_only(pixels))
    torch.testing.assert_close(features[..., width:], caught["block"].flatten(2).transpose(1, 2))
    assert both.identity != head_only.identity  # cached features of one are never read as the other's


@pytest.mark.parametrize("last_block_features", [False, True])
def test_efficientnet_features_in_channels_last_are_those_of_the_plain_layout(random_efficientnet, images,
                                                                              last_block_features):
    # vlm runs the CNN on NHWC tensors for speed; tokens must still come out in row-major spatial order.
    config = VisionConfig(backend="efficientnet", name="efficientnet-lite0", pretrained=random_efficientnet,
                          image_size=64, last_block_features=last_block_features)
    encoder = build_vision_encoder(config)
    plain = build_vision_encoder(config)
    plain.tower.to(memory_format=torch.contiguous_format)
    pixels = encoder.preprocess(images[:2])
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), plain(pixels), rtol=1e-4, atol=1e-4)


def test_last_block_features_on_a_clip_tower_is_a_config_error(tiny_clip_dir):
    with pytest.raises(ConfigError, match="efficientnet backend only"):
        build_vision_encoder(VisionConfig(backend="hf", name=str(tiny_clip_dir), last_block_features=True))
