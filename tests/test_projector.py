import pytest
import torch

from vlm.config import ConfigError, ProjectorConfig
from vlm.projector import Projector


def test_pixel_shuffle_merges_each_neighbourhood_into_one_token():
    projector = Projector(ProjectorConfig(type="linear", compress="pixel_shuffle", factor=2), 3, 8, num_patches=16)
    features = torch.randn(2, 16, 3)
    merged = projector.compress(features)
    grid = features.reshape(2, 4, 4, 3)
    for r in range(2):
        for c in range(2):
            block = grid[:, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2].reshape(2, 12)
            assert torch.equal(merged[:, r * 2 + c], block)
    assert projector(features).shape == (2, 4, 8) and projector.num_tokens == 4


def test_pool_averages_regions():
    projector = Projector(ProjectorConfig(type="mlp2x_gelu", compress="pool", num_tokens=4), 3, 8, num_patches=16)
    features = torch.randn(1, 16, 3)
    pooled = projector.compress(features)
    torch.testing.assert_close(pooled[0, 3], features.reshape(4, 4, 3)[2:, 2:].mean((0, 1)))
    assert projector(features).shape == (1, 4, 8)


@pytest.mark.parametrize("config, match", [
    (ProjectorConfig(compress="pixel_shuffle", factor=3), "factor"),
    (ProjectorConfig(compress="pool", num_tokens=5), "num_tokens"),
])  # an unknown projector.type is refused when the config is parsed (tests/test_config.py)
def test_bad_projector_settings_name_the_key(config, match):
    with pytest.raises(ConfigError, match=match):
        Projector(config, 3, 8, num_patches=16)


def test_layernorm_makes_the_projection_blind_to_feature_offset_and_scale():
    projector = Projector(ProjectorConfig(type="linear", norm="layernorm"), 6, 4, num_patches=4)
    features = torch.randn(2, 4, 6)
    torch.testing.assert_close(projector(features), projector(features * 5 + 3), atol=1e-4, rtol=1e-4)
    plain = Projector(ProjectorConfig(type="linear"), 6, 4, num_patches=4)
    assert not torch.allclose(plain(features), plain(features * 5 + 3))
