"""make run: how it turns SOURCE into the DVC command, with a stand-in dvc."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import PROJECT_ROOT

# Writes its arguments as JSON, so a test can check exactly what make passed.
FAKE_DVC = f"""#!{sys.executable}
import json, sys
with open("dvc-arguments.json", "w") as handle:
    json.dump(sys.argv[1:], handle)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with the Makefile, an installed-looking .venv and the stand-in dvc."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(PROJECT_ROOT / "Makefile", folder / "Makefile")
    for name in ("requirements.txt", "constraints.txt", "pyproject.toml"):
        (folder / name).write_text("")
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "dvc").write_text(FAKE_DVC)
    (bin_dir / "dvc").chmod(0o755)
    # Newer than its prerequisites, so make does not install anything.
    (folder / ".venv" / "installed").write_text("")
    return folder


def make_run(project: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "run", *arguments],
        cwd=project, capture_output=True, text=True, timeout=60,
    )


def dvc_arguments(project: Path) -> list[str]:
    return json.loads((project / "dvc-arguments.json").read_text())


@pytest.mark.parametrize("name", ["plain", "with space", "x (copy)", "a,b", "it's", "x=1"])
def test_source_reaches_dvc_unchanged(project, tmp_path, name):
    source = tmp_path / name
    source.mkdir()
    result = make_run(project, f"SOURCE={source}")

    # Parentheses, commas, quotes and = made DVC reject the override.
    assert result.returncode == 0, result.stderr
    arguments = dvc_arguments(project)
    assert arguments[:3] == ["exp", "run", "-S"]
    override = OverridesParser.create().parse_overrides([arguments[3]])[0]
    assert override.key_or_group == "data.source"
    assert override.value() == str(source)


def test_empty_source_is_an_error(project):
    result = make_run(project, "SOURCE=")

    assert result.returncode == 2
    assert "error: SOURCE is empty" in result.stderr
    assert not (project / "dvc-arguments.json").exists()


def test_no_source_reproduces(project):
    result = make_run(project)

    assert result.returncode == 0, result.stderr
    assert dvc_arguments(project) == ["repro"]
