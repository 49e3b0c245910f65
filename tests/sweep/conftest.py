"""Fixtures of the sweep tests: a tiny trajectory dataset made once per session, and the
Slurm requirement (fail, not skip, when Slurm is down unless POLAR_SKIP_SLURM=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_helpers import DATASET, require_slurm


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A trajectory dataset written by the real `generate` stage."""
    from polar_scaling.config import from_dict
    from polar_scaling.data_generate import GenerateArgs, generate

    path = tmp_path_factory.mktemp("sweep-data") / "world"
    generate(from_dict(GenerateArgs, DATASET), path)
    return path


@pytest.fixture
def slurm():
    """Fail (not skip) unless a Slurm node is up; POLAR_SKIP_SLURM=1 skips instead."""
    require_slurm()
