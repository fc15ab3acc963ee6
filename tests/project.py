"""Build a throwaway copy of the project in a temporary git + DVC repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import PROJECT_ROOT

PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml")
BIN = Path(sys.executable).parent


def run(command: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command with the test interpreter's tools first on PATH; fail loudly."""
    environment = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    environment.pop("AUDIOMNIST_DEBUG", None)
    # dvc exp run commits experiments, which needs an identity on any machine.
    for variable in ("GIT_AUTHOR", "GIT_COMMITTER"):
        environment.setdefault(f"{variable}_NAME", "test")
        environment.setdefault(f"{variable}_EMAIL", "test@localhost")
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def make_project(folder: Path, source: Path, **overrides: dict) -> Path:
    """Copy the project files into ``folder``, point ``data.source`` at ``source``, commit.

    ``overrides`` maps a params section to the keys to change in it.
    """
    folder.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy(PROJECT_ROOT / name, folder / name)
    shutil.copytree(PROJECT_ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (folder / ".dvc").mkdir()
    shutil.copy(PROJECT_ROOT / ".dvc" / "config", folder / ".dvc" / "config")
    shutil.copy(PROJECT_ROOT / ".dvc" / ".gitignore", folder / ".dvc" / ".gitignore")
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", folder / ".dvc" / "plots")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    for section, values in overrides.items():
        params[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "project copy")
    return folder


def git(folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Run git with a fixed identity, so commits work on machines without one."""
    return run(
        ["git", "-c", "user.email=test@localhost", "-c", "user.name=test", *arguments], folder
    )


def dvc(folder: Path, *arguments: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a DVC command in ``folder``."""
    return run([str(BIN / "dvc"), *arguments], folder, timeout=timeout)


def locked_outputs(folder: Path) -> dict[str, str]:
    """Return the md5 of every stage output recorded in ``dvc.lock``."""
    lock = yaml.safe_load((folder / "dvc.lock").read_text())
    hashes = {}
    for stage in lock["stages"].values():
        for output in stage.get("outs", []):
            hashes[output["path"]] = output["md5"]
    return hashes


def metrics(folder: Path) -> dict:
    """Return ``dvc metrics show --json`` for the workspace."""
    return json.loads(dvc(folder, "metrics", "show", "--json").stdout)
