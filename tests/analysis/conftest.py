"""Shared fixtures: the reference tables in ../shared/anchors and synthetic result tables."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANCHORS = (REPO / ".." / "shared" / "anchors").resolve()

from synthetic_tables import learning_curves  # noqa: E402


@pytest.fixture(scope="session")
def anchors() -> Path:
    """The anchors folder; a missing folder is a broken checkout, so fail rather than skip."""
    if not ANCHORS.is_dir():
        pytest.fail(f"reference data missing: expected {ANCHORS} (shared/ beside the repo)")
    return ANCHORS


@pytest.fixture
def results_csv(tmp_path) -> Path:
    path = tmp_path / "results.csv"
    learning_curves().to_csv(path, index=False)
    return path
