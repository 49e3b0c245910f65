"""Shared small fixtures: a tiny synthetic world and one tiny generated dataset per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from tiny_world import TINY_GENERATE, TINY_WORLD, tiny_args  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """One generated tiny dataset, shared read-only by the tests."""
    from polar_scaling.data_generate import generate

    path = tmp_path_factory.mktemp("tiny") / "data"
    generate(tiny_args(), path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread, and the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
