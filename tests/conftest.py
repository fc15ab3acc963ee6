"""Shared fixtures: project paths and small generated data sets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))

from synthetic import make_dataset  # noqa: E402

# The real recordings, when a local copy sits beside the repository.
REAL_DATA = Path(
    os.environ.get("AUDIOMNIST_DATA", PROJECT_ROOT.parent / "shared" / "audiomnist" / "data")
)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A 60-recording data set of 4 speakers with three planted defects."""
    return make_dataset(tmp_path / "source")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty temporary folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
