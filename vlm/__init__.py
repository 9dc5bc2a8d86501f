"""vlm: a frozen vision encoder and a frozen causal LM joined by a trainable projector (LLaVA-style)."""

from vlm.config import Config, ConfigError, ModelConfig, load_config
from vlm.model import VisionLanguageModel

__all__ = ["Config", "ConfigError", "ModelConfig", "VisionLanguageModel", "load_config"]
