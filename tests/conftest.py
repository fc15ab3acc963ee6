"""Shared fixtures: project paths and small generated data sets."""

from __future__ import annotations

import os
import signal
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


@pytest.fixture
def ctrl_c() -> None:
    """Let SIGINT raise KeyboardInterrupt in this process, as Ctrl-C does in a terminal.

    A process started in the background by a non-interactive shell (a CI job,
    for example) begins with SIGINT ignored, and Python then installs no
    handler for it.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def default_sigint() -> None:
    """Give a child process the default SIGINT action, for ``preexec_fn``.

    Ignored signals stay ignored across exec, so without this a child of a
    background process would ignore Ctrl-C too.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
