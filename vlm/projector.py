"""The trainable bridge: image patch features [B, N, D_vision] -> LM embeddings [B, M, D_lm]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ConfigError, ProjectorConfig


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConfigError(
            f"token compression needs a square patch grid, but the encoder gives {num_patches} patches; "
            "set model.projector.compress=none or keep the CLS token out (model.vision.drop_cls=true)"
        )
    return side


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig, vision_dim: int, lm_dim: int, num_patches: int):
        super().__init__()
        self.config = config
        self.num_patches = num_patches
        in_dim = vision_dim
        if config.compress == "pixel_shuffle":
            side = _grid_side(num_patches)
            if config.factor < 1 or side % config.factor:
                raise ConfigError(
                    f"model.projector.factor={config.factor} must divide the {side}x{side} patch grid; "
                    f"pick a divisor of {side}"
                )
            in_dim = vision_dim * config.factor**2
        elif config.compress == "pool":
            _grid_side(num_patches)
            target = math.isqrt(config.num_tokens)
            if target < 1 or target * target != config.num_tokens or config.num_tokens > num_patches:
                raise ConfigError(
                    f"model.projector.num_tokens={config.num_tokens} must be a square number "
                    f"no larger than the encoder's {num_patches} patches, e.g. 16 or 64"
                )
        self.in_dim = in_dim  # features per image token after compression
        self.norm = nn.LayerNorm(in_dim) if config.norm == "layernorm" else nn.Identity()
        if config.type == "linear":
            self.proj = nn.Linear(in_dim, lm_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    @property
    def num_tokens(self) -> int:
        """Image tokens each image takes in the LM's sequence."""
        if self.config.compress == "pixel_shuffle":
            return self.num_patches // self.config.factor**2
        if self.config.compress == "pool":
            return self.config.num_tokens
        return self.num_patches

    def compress(self, features: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        if self.config.compress == "none":
            return features
        side = math.isqrt(n)
        grid = features.reshape(b, side, side, d)
        if self.config.compress == "pixel_shuffle":
            f = self.config.factor
            grid = grid.reshape(b, side // f, f, side // f, f, d).permute(0, 1, 3, 2, 4, 5)
            return grid.reshape(b, (side // f) ** 2, f * f * d)
        target = math.isqrt(self.config.num_tokens)
        pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), target)
        return pooled.flatten(2).transpose(1, 2)

    def project(self, compressed: torch.Tensor) -> torch.Tensor:
        """The trainable part, on features that `compress` already reduced (what the feature cache stores)."""
        return self.proj(self.norm(compressed))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(self.compress(features))
