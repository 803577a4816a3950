"""The architecture, checked: the import layers of .importlinter, and every collective call of
megalign going through megalign/platform/collectives.py (which puts tensors on the device the
process group needs: NCCL takes CUDA tensors only, which no CPU test would otherwise notice)."""

import ast
import textwrap

import pytest

from conftest import REPO, run_python

COLLECTIVES = {
    "all_reduce", "broadcast", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all",
    "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier",
    "monitored_barrier", "broadcast_object_list", "gather_object", "scatter_object_list",
}
HELPERS = REPO / "megalign" / "platform" / "collectives.py"


def offending_calls(source: str) -> list[str]:
    """Calls of torch.distributed collectives in ``source``, however the module was imported."""
    tree = ast.parse(source)
    modules, functions = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            functions |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            modules |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in functions:
            found.append(f"{func.id} (line {node.lineno})")
        elif isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            if ast.unparse(func.value) in modules:
                found.append(f"{ast.unparse(func)} (line {node.lineno})")
    return found


@pytest.mark.unit
def test_the_checker_sees_every_import_form():
    assert offending_calls("import torch.distributed as dist\ndist.all_reduce(x)")
    assert offending_calls("import torch\ntorch.distributed.broadcast(x, 0)")
    assert offending_calls("from torch.distributed import barrier\nbarrier()")
    assert offending_calls("from torch import distributed as d\nd.isend(x, 1)")
    assert not offending_calls("from megalign.platform import collectives\n"
                               "collectives.all_reduce(x)")


@pytest.mark.unit
def test_megalign_calls_collectives_only_through_the_helpers():
    found = {str(path.relative_to(REPO)): calls
             for path in sorted((REPO / "megalign").rglob("*.py")) if path != HELPERS
             for calls in [offending_calls(path.read_text(encoding="utf-8"))] if calls}
    assert not found, f"use megalign.platform.collectives instead: {found}"


def test_helpers_keep_the_callers_tensor_and_device():
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from megalign.platform import collectives
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        x = torch.tensor([1.0, 2.0])
        assert collectives.all_reduce(x) is x and x.tolist() == [1.0, 2.0]
        assert collectives.group_device() == torch.device("cpu")
        assert [t.tolist() for t in collectives.all_gather(x)] == [[1.0, 2.0]]
        assert collectives.broadcast(x, src=0) is x
        assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
        collectives.barrier()
        dist.destroy_process_group()
        print("ok")
    """)
    assert run_python(["-c", script]).stdout.strip() == "ok"


@pytest.mark.unit
def test_import_layers_hold():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(REPO / ".importlinter"), no_cache=True) == 0
