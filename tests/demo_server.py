"""Helpers for the tests that serve the demo app on a free loopback port (fixtures in conftest.py)."""

from __future__ import annotations

import socket

CHECKPOINT_LABEL = "checkpoint tests/tiny-random"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
