"""Which Megatron-Core release is installed, for the few places where megalign's behaviour depends
on it (the CPU adapter's redirections, the asynchronous checkpoint strategy).

Why one place: each version test names the release that changed something, so when the tested
range in ``setup.py`` moves, the tests of ``tests/test_platform.py`` show which of them still hold.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version


def megatron_core() -> Version:
    return Version(metadata.version("megatron-core"))


def megatron_core_at_least(release: str) -> bool:
    return megatron_core() >= Version(release)
