"""Shared fixtures: the published data folder (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the work tree; the test is skipped when it is absent."""
    if not (SHARED_DATA / "perception_comparison").is_dir():
        pytest.skip(f"shared data not available at {SHARED_DATA / 'perception_comparison'}")
    return SHARED_DATA
