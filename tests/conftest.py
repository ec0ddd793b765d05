"""Shared fixtures: tiny bases made by the project's own code, never downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A randomly initialised base with the embedded tokenizer and dimensions (no pretraining)."""
    from loraplex.training.base import build_base

    return build_base(tmp_path_factory.mktemp("tiny_base"), steps=0, seed=3)


@pytest.fixture(scope="session")
def embedded_base() -> Path:
    from loraplex.training.base import ensure_base

    return ensure_base()


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project command as a user would, from the repo root (env: instead of this one's)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(os.environ if env is None else env), "PYTHONWARNINGS": "ignore"},
    )


def free_port() -> int:
    """A loopback port nothing listens on right now (for Serve's HTTP, gRPC and metrics ports)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
