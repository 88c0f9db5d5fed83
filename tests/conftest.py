"""Shared fixtures and marker handling.

Markers: ``slow`` (trains a model or starts a cluster), ``ray`` (starts a local Ray instance),
``gpu`` (needs CUDA; skipped automatically where there is none).
"""

from __future__ import annotations

import os
import sys
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


def pytest_sessionfinish(session, exitstatus):
    session.config._cortexlens_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own exit status once everything is reported, without
    the interpreter's finalisation. The suite leaves native threads behind (gRPC C-core, Ray's
    core worker, ONNX Runtime and torch pools; every server and cluster is stopped, their
    threads are not all joined), and tearing those down at interpreter exit crashed once after
    a fully reported run (segmentation fault after the summary: exit 139 for a run whose tests
    had all been reported). ``CORTEXLENS_TEST_NORMAL_EXIT=1`` keeps the normal exit."""
    status = getattr(config, "_cortexlens_exitstatus", None)
    if status is None or os.environ.get("CORTEXLENS_TEST_NORMAL_EXIT") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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
