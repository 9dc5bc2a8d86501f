"""The demo app on a tiny random model, served on a free loopback port for a test module."""

from __future__ import annotations

import socket

import pytest
import torch

CHECKPOINT_LABEL = "checkpoint tests/tiny-random"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_model(tiny_model_config):
    from vlm.model import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(tiny_model_config)


@pytest.fixture(scope="module")
def demo_url(demo_model):
    from demo.app import build_app

    app = build_app(demo_model, CHECKPOINT_LABEL)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()
