"""Shared fixtures and marker handling.

Markers: ``slow`` (trains a model or starts a cluster), ``ray`` (starts a local Ray instance),
``gpu`` (needs CUDA; skipped automatically where there is none).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARK_DIR = Path(os.environ.get("CORTEXLENS_DATA", REPO.parent / "shared" / "data" / "park2024"))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def park_dir() -> Path:
    if not PARK_DIR.is_dir():
        pytest.fail(f"real data missing: {PARK_DIR} (expected ../shared/data/park2024)")
    return PARK_DIR


@pytest.fixture(scope="session")
def park_files(park_dir) -> list[Path]:
    return sorted(park_dir.glob("*.mat"))


@pytest.fixture(scope="session")
def park_recordings(park_files):
    from models.data.park import read_park

    return [read_park(p) for p in park_files]
