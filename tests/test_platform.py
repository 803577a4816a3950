"""The CPU adapter is the only place that patches anything, and its targets still exist."""

import importlib
import re
from pathlib import Path

import pytest
import torch

from megalign.platform import cpu, releases

pytestmark = pytest.mark.unit

PACKAGE = Path(cpu.__file__).resolve().parents[1]


def resolve(site: str):
    """The object a dotted path names (a module attribute, or a class's)."""
    parts = site.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            node = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            node = getattr(node, name)
        return node
    raise ImportError(site)


def test_patched_sites_exist_in_the_pinned_megatron_core():
    for site in cpu.PATCHED_SITES:
        assert resolve(site) is not None, site


def test_redirections_by_release_are_applied_where_megatron_core_calls_them_and_nowhere_else():
    """Each redirection a Megatron-Core release started to need is applied exactly on the
    releases whose module calls the CUDA-only function: it is still needed where applied (the
    installed release calls it) and not missing where skipped (an older release does not)."""
    applied = cpu.redirections_since_release()
    for site, module, since in cpu.SINCE_RELEASE:
        source = Path(importlib.import_module(module).__file__).read_text()
        calls = re.search(rf"\b{re.escape(site)}\(\)", source) is not None
        assert calls == (site in applied), (site, module, since, str(releases.megatron_core()))
        assert resolve(site) is not None and site in cpu._CPU_COUNTERPARTS


def test_cuda_type_names_and_rng_state_on_the_cpu():
    """Megatron's optimizers sort parameters by ``Tensor.type()``'s CUDA names; a conversion
    with an argument is left alone. Recomputation's saved "CUDA" RNG state is the CPU one."""
    with cpu._CudaToCpu():
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    state = cpu._cpu_get_rng_state()
    first = torch.rand(3)
    cpu._cpu_set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


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


@pytest.mark.skipif(not releases.megatron_core_at_least("0.19.0"),
                    reason="Megatron-Core 0.19's notices: run by the compatibility tier")
def test_filtered_megatron_core_notices_are_still_its_own():
    """The notices megalign keeps from its output are logged by the modules named: a filter
    whose notice is gone from the release goes."""
    import megalign

    for module, notice in megalign._CHECKED_NOTICES:
        assert notice in Path(importlib.import_module(module).__file__).read_text(), notice
