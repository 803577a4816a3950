"""The CPU adapter is the only place that patches anything, and its targets still exist."""

import importlib
import re
from pathlib import Path

import torch

from megalign.platform import cpu

PACKAGE = Path(cpu.__file__).resolve().parents[1]


def test_patched_sites_exist_in_the_pinned_megatron_core():
    for site in cpu.PATCHED_SITES:
        module, _, attr = site.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), site


def test_globals_defined_only_with_transformer_engine_are_still_read():
    """Each global the adapter defines is read by its module (when a new megatron-core release
    stops reading it, the line in cpu.py goes)."""
    for site in cpu.UNDEFINED_WITHOUT_TE:
        module, _, name = site.rpartition(".")
        source = Path(importlib.import_module(module).__file__).read_text()
        assert re.search(rf"\b{name}\b", source), site


def test_no_other_module_patches_torch_or_megatron():
    assignment = re.compile(r"^\s*(torch|mcore_\w+|clip_grads|optimizer)\.[\w.]+\s*=[^=]", re.M)
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "cpu.py" and assignment.search(p.read_text())]
    assert offenders == []
    assert "cpu.apply()" in (PACKAGE / "distributed.py").read_text()


def test_cpu_tracker_forks_named_streams():
    if torch.cuda.is_available():
        return
    tracker = cpu._cpu_rng_tracker_class()()
    tracker.add("a", 1)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    with tracker.fork("a"):
        second = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(first, second)
    torch.manual_seed(1)
    assert torch.equal(first, torch.rand(3))
