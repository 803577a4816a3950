"""Checkpoints through ``megatron.core.dist_checkpointing`` (torch_dist format).

A training checkpoint holds the student's weights, the optimizer state, the LR schedule, per-rank
RNG states, and (in the common part) the iteration, consumed samples, config and a fingerprint of
the AR checkpoint the teacher comes from. The teacher itself is not saved: it *is* that AR
checkpoint.

Writes are atomic: everything goes into ``<root>/iter_NNNNNNN.tmp``, which rank 0 renames to
``iter_NNNNNNN`` once every rank has finished, and only then rewrites ``<root>/latest`` (also via a
rename). A killed save therefore leaves the previous checkpoint and ``latest`` untouched. An
asynchronous save (``async_queue``, from ``async_save_queue()``) writes the tensors from a forked
helper while training goes on; the rename and ``latest`` follow when the queue is finalized, under
the same rules.
Parameters are checked to be finite before anything is written. Tensors are stored with global
keys (global layer numbers, TP offsets), so a checkpoint loads into any TP/PP/VPP layout.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import random as mcore_random
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megalign.errors import CheckpointError, first_line
from megalign.platform import collectives
from megalign.platform.process import (
    die_with_parent,
    own_checkpoint_writer_queue,
    sigusr1_blocked_in_helpers,
)
from megalign.platform.releases import megatron_core, megatron_core_at_least

LATEST = "latest"
# the distributed optimizer's states in Megatron's canonical per-parameter layout (gathered over DP
# when saving), the format that reshards (tested: to another data-parallel size)
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
_ITERATION_DIR = re.compile(r"^iter_(\d{7})$")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def resolve(path: str) -> str:
    """A checkpoint directory, or a root whose ``latest`` names one."""
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest, "rb") as handle:
            name = handle.read().decode("utf-8", "replace").strip()
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise CheckpointError(
                f"'{latest}' names {name!r}, not a checkpoint directory inside '{path}'; it "
                "should hold a name such as iter_0000100 (write it again or give that directory)"
            )
        path = os.path.join(path, name)
    if not os.path.isdir(path) or not _is_distributed_checkpoint(path):
        raise CheckpointError(
            f"'{path}' is not a complete megalign checkpoint (no metadata.json); give a directory "
            "written by megalign (iter_NNNNNNN) or a checkpoint root with a 'latest' file"
        )
    _check_safe_to_load(path)
    return path


def _is_distributed_checkpoint(path: str) -> bool:
    """Megatron's check, with a damaged ``metadata.json`` named instead of a JSON traceback."""
    try:
        return dist_checkpointing.check_is_distributed_checkpoint(path)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"'{os.path.join(path, 'metadata.json')}' is damaged ({first_line(err)}); the "
            "checkpoint may be truncated or incompletely copied"
        ) from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's ``.metadata`` (a plain ``pickle``, which would
    run any code a crafted file names) allowing only the types such metadata is made of."""

    _DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                    "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        obj = (getattr(importlib.import_module(module), name, None) if module.startswith("torch")
               else None)
        allowed = (
            (module in self._DCP_MODULES and isinstance(obj, type))
            or (module == "torch" and (name == "Size" or isinstance(obj, torch.dtype)))
            or (module, name) in (("torch.serialization", "_get_layout"),
                                  ("collections", "OrderedDict"))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"'{module}.{name}' is not allowed in checkpoint metadata")
        return obj if obj is not None else super().find_class(module, name)


def _check_safe_to_load(path: str) -> None:
    """Refuse a checkpoint whose pickled parts would execute code when loaded: ``.metadata``
    through an allow-list; the common state (``common.pt``, or from Megatron-Core 0.19 an object
    in the ``.distcp`` files) and every other pickled object of the ``.distcp`` files (random
    states, extra states), which torch.distributed.checkpoint unpickles with
    ``weights_only=False``, through ``torch.load(weights_only=True)``."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        common = os.path.join(path, "common.pt")
        if os.path.isfile(common):
            file = common
            torch.load(common, map_location="cpu", weights_only=True)
        for file, offset, length in _pickled_objects(path, metadata):
            with open(file, "rb") as handle, warnings.catch_warnings():
                # a crafted pickle's protocol: the refusal below says what it holds
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                handle.seek(offset)
                torch.load(io.BytesIO(handle.read(length)), map_location="cpu",
                           weights_only=True)
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, OSError,
            RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"refusing to load checkpoint '{path}': {file} is not plain checkpoint data "
            f"({_unpickling_reason(err)}); it may be corrupt or crafted to run code. Only load "
            "checkpoints from sources you trust"
        ) from None


def _unpickling_reason(err: BaseException) -> str:
    """What torch's weights-only unpickler refused (its message opens with advice that does not
    apply here), else the error's first line."""
    _, found, reason = str(err).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[0] if found and lines else first_line(err)


def _pickled_objects(path: str, metadata) -> list[tuple[str, int, int]]:
    """(file, offset, length) of each object the ``.distcp`` files hold as pickled bytes."""
    pickled = {key for key, entry in metadata.state_dict_metadata.items()
               if isinstance(entry, BytesStorageMetadata)}
    found = []
    for index, where in metadata.storage_data.items():
        if index.fqn not in pickled:
            continue
        name = where.relative_path
        if name != os.path.basename(name) or getattr(where, "transform_descriptors", None):
            raise ValueError(f"'{index.fqn}' is stored as {name!r} with transforms "
                             f"{getattr(where, 'transform_descriptors', None)}")
        found.append((os.path.join(path, name), where.offset, where.length))
    return found


def fingerprint(path: Optional[str]) -> Optional[str]:
    """Cheap identity of a checkpoint directory: names, sizes and metadata of its files."""
    if not path:
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        digest.update(f"{name}:{os.path.getsize(file)}".encode())
        if name.endswith(".json"):
            with open(file, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _model_state(chunks: list) -> dict:
    return {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}


def _rng_state() -> ShardedObject:
    """This rank's RNG states, one shard per (PP, TP, DP) position, and CP position under
    context parallelism."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": mcore_random.get_cuda_rng_tracker().get_states(),
    }
    ranks = [
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    ]
    sizes = [
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    ]
    if parallel_state.get_context_parallel_world_size() > 1:
        ranks.append(parallel_state.get_context_parallel_rank())
        sizes.append(parallel_state.get_context_parallel_world_size())
    return ShardedObject("rng_state", state, tuple(sizes), tuple(ranks), replica_id=0)


def layout() -> list[int]:
    """[TP, PP, VPP, DP] (and CP under context parallelism): RNG states resume only into the
    layout that wrote them."""
    sizes = [
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        parallel_state.get_data_parallel_world_size(),
    ]
    if parallel_state.get_context_parallel_world_size() > 1:
        sizes.append(parallel_state.get_context_parallel_world_size())
    return sizes


def _check_finite(chunks: list, where: str) -> None:
    bad = torch.zeros(1)
    for chunk in chunks:
        for param in chunk.parameters():
            if not torch.isfinite(param.detach()).all():
                bad += 1
    collectives.all_reduce(bad)
    if bad.item():
        raise CheckpointError(f"refusing to write {where}: the model has NaN/inf parameters")


def _agree(error: Optional[BaseException], path: str, temp: Optional[str] = None) -> None:
    """Collective: if any rank failed, every rank raises the same CheckpointError (naming the
    first failing rank's cause), after rank 0 removed the partial ``temp`` directory."""
    flag = torch.tensor([0.0 if error is None else 1.0])
    collectives.all_reduce(flag, op=collectives.ReduceOp.MAX)
    if not flag.item():
        return
    reasons = collectives.all_gather_object(None if error is None else first_line(error))
    rank, reason = next((r, text) for r, text in enumerate(reasons) if text is not None)
    if dist.get_rank() == 0 and temp is not None:
        shutil.rmtree(temp, ignore_errors=True)
    raise CheckpointError(
        f"could not write checkpoint '{path}' (rank {rank}: {reason}); the previous checkpoint "
        "and 'latest' are unchanged. Free space or fix permissions on the checkpoint directory"
    )


def _state_bytes(state: dict) -> int:
    """Bytes this rank will write: main replicas of sharded tensors (plain tensors on rank 0)."""
    total = 0
    for value in nested_values(state):
        data = getattr(value, "data", value)
        if not torch.is_tensor(data):
            continue
        if hasattr(value, "replica_id"):
            owned = is_main_replica(value.replica_id)
        else:
            owned = dist.get_rank() == 0
        total += data.numel() * data.element_size() if owned else 0
    return total


def _preflight(temp: str, state: dict) -> Optional[BaseException]:
    """Check, before anything is written, that every rank can write ``temp`` and that the whole
    checkpoint fits: Megatron's save would otherwise fail on some ranks only, mid-collective."""
    needed = torch.tensor([float(_state_bytes(state))])
    collectives.all_reduce(needed)
    try:
        probe = os.path.join(temp, f".probe-{dist.get_rank()}")
        with open(probe, "wb") as handle:
            handle.write(b"\0")
        os.remove(probe)
        free = shutil.disk_usage(temp).free
        required = int(needed.item() * 1.05) + (1 << 20)
        if free < required:
            return OSError(f"needs about {required / 2**20:.1f} MiB but {temp} has "
                           f"{free / 2**20:.1f} MiB free")
    except OSError as err:
        return err
    return None


# from this release Megatron-Core writes a checkpoint's common state into its .distcp files
COMMON_STATE_INSIDE_SINCE = "0.19.0"
# from this release, Megatron-Core's own asynchronous save is deprecated for NVRx's
NVRX_ASYNC_SINCE = "0.19.0"
NVRX_ASYNC_MIN = "0.6.0"  # the oldest nvidia-resiliency-ext those releases accept


def async_save_queue():
    """The queue asynchronous saves are scheduled on, of the writer Megatron-Core prefers:
    nvidia-resiliency-ext's (NVRx) from Megatron-Core 0.19, its own before. NVRx's queue forks one
    writer per save (``persistent=False``), as Megatron-Core's did, so a writer still dies with
    its rank and stays out of SIGUSR1 (``platform.process``)."""
    if not megatron_core_at_least(NVRX_ASYNC_SINCE):
        return AsyncCallsQueue()
    if not getattr(torch_strategy, "HAVE_NVRX", False):
        raise CheckpointError(
            f"checkpoint.async_save=true with megatron-core {megatron_core()} writes through "
            f"nvidia-resiliency-ext>={NVRX_ASYNC_MIN}, which this Python cannot import: "
            "pip install 'megalign[resilience]', or set checkpoint.async_save=false")
    nvrx = importlib.import_module("nvidia_resiliency_ext.checkpointing.async_ckpt.core")
    return nvrx.AsyncCallsQueue(persistent=False)


def _async_save_arguments() -> dict:
    """What ``dist_checkpointing.save`` takes to return a request for ``async_save_queue()``."""
    if megatron_core_at_least(NVRX_ASYNC_SINCE):
        return {"async_sharded_save": True, "async_strategy": "nvrx"}
    return {"async_sharded_save": True}


def _write_atomic(path: str, state: dict, async_queue=None, then: Callable[[], None] = None):
    """dist_checkpointing.save into ``path.tmp``, renamed to ``path`` once every rank is done,
    then ``then()``. Every step that can fail is agreed on by all ranks, so a failure never leaves
    some ranks waiting in a collective, nor a partial directory behind. With ``async_queue`` the
    tensors are written by a helper forked now and the rest happens when the queue is finalized
    (a failure is raised there)."""
    temp = path + ".tmp"
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            shutil.rmtree(temp, ignore_errors=True)
            os.makedirs(temp)
        except OSError as err:
            error = err
    _agree(error, path, temp)
    _agree(_preflight(temp, state), path, temp)
    request = None
    try:
        with sigusr1_blocked_in_helpers():
            own_checkpoint_writer_queue()
            request = dist_checkpointing.save(
                state, temp, **(_async_save_arguments() if async_queue is not None else {}))
    except (Exception, CheckpointException) as err:  # the latter is a BaseException
        error = err
    _agree(error, path, temp)

    def finish(written: Callable[[], None] = lambda: None) -> None:
        error: Optional[BaseException] = None
        try:
            written()
        except (Exception, CheckpointException) as err:
            error = err
        _agree(error, path, temp)
        if dist.get_rank() == 0:
            try:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                os.replace(temp, path)
            except OSError as err:
                error = err
        _agree(error, path, temp)
        if then is not None:
            then()

    if request is None:
        finish()
        return

    megatron_finalization = list(request.finalize_fns)  # write results gathered, metadata.json

    def written() -> None:
        for finalize in megatron_finalization:
            finalize()

    # the helper dies with this rank (a killed rank leaves no writer behind) and, forked with
    # SIGUSR1 blocked, keeps out of the stop signal a save may be answering
    writer = request.async_fn
    request = request._replace(
        async_fn=None if writer is None else _dying_with_parent(writer),
        finalize_fns=[lambda: finish(written)])
    with sigusr1_blocked_in_helpers():
        async_queue.schedule_async_request(request)


def _dying_with_parent(function: Callable) -> Callable:
    def helper(*args, **kwargs):
        die_with_parent()
        return function(*args, **kwargs)

    return helper


def save_weights(path: str, chunks: list, meta: Optional[dict] = None) -> str:
    """A weights-only checkpoint (an AR model to start from, or to convert)."""
    _check_finite(chunks, path)
    _write_atomic(path, {"model": _model_state(chunks), "meta": dict(meta or {}, layout=layout())})
    collectives.barrier()
    return path


def save_checkpoint(
    root: str,
    iteration: int,
    chunks: list,
    optimizer,
    scheduler,
    meta: Optional[dict] = None,
    keep_last_n: int = 0,
    async_queue=None,
) -> str:
    """Write ``<root>/iter_NNNNNNN`` atomically and point ``latest`` at it; returns the path.
    With ``async_queue`` (``async_save_queue()``) the write goes on in the background
    and is complete, ``latest`` included, once the queue has been finalized."""
    path = checkpoint_dir(root, iteration)
    _check_finite(chunks, path)
    state = {
        "model": _model_state(chunks),
        "meta": dict(meta or {}, layout=layout()),
        "scheduler": scheduler.state_dict(),
        "rng_state": _rng_state(),
    }
    state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=OPTIMIZER_FORMAT)

    def publish() -> None:
        error = None
        if dist.get_rank() == 0:
            try:
                _write_latest(root, os.path.basename(path))
                _prune(root, keep_last_n)
            except OSError as err:
                error = err
        _agree(error, os.path.join(root, LATEST))

    _write_atomic(path, state, async_queue, then=publish)
    return path


def _write_latest(root: str, name: str) -> None:
    temp = os.path.join(root, LATEST + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, os.path.join(root, LATEST))


def _prune(root: str, keep_last_n: int) -> None:
    if keep_last_n <= 0:
        return
    iterations = sorted(
        int(m.group(1)) for m in map(_ITERATION_DIR.match, os.listdir(root)) if m is not None
    )
    for iteration in iterations[:-keep_last_n]:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def read_meta(path: str) -> dict:
    """The common (non-sharded) part of a checkpoint: iteration, config, layout, ..."""
    if (not os.path.isfile(os.path.join(path, "common.pt"))
            and not megatron_core_at_least(COMMON_STATE_INSIDE_SINCE)):
        raise CheckpointError(
            f"checkpoint '{path}' keeps its common state inside its .distcp files (no common.pt), "
            f"as megatron-core {COMMON_STATE_INSIDE_SINCE} and later write it, which megatron-core "
            f"{megatron_core()} here cannot read; open it with megalign on megatron-core 0.19 "
            "(Python 3.12)")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except (Exception, CheckpointException) as err:  # the latter from Megatron-Core 0.19's format
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({first_line(err)})") from None
    meta = common.get("meta", {}) if isinstance(common, dict) else None
    expected = {"iteration": int, "consumed_samples": int, "config": dict, "layout": list,
                "ar_checkpoint": (str, type(None))}
    wrong = [key for key, kind in expected.items() if key in (meta or {})
             and (not isinstance(meta[key], kind) or isinstance(meta[key], bool))]
    if not isinstance(meta, dict) or wrong or meta.get("iteration", 0) < 0:
        raise CheckpointError(f"checkpoint '{path}' has damaged metadata ({wrong or 'meta'}); it "
                              "may be corrupt or not written by megalign")
    return meta


def load_checkpoint(path: str, chunks: list, optimizer=None, scheduler=None) -> dict:
    """Load weights (and, when given, optimizer/schedule/RNG) from ``path``; returns its meta."""
    path = resolve(path)
    meta = read_meta(path)
    template = {"model": _model_state(chunks)}
    resume = optimizer is not None
    if resume and "iteration" not in meta:
        raise CheckpointError(
            f"'{path}' holds model weights only (no optimizer state or iteration); "
            "start a run from it with model.init_checkpoint instead of checkpoint.load"
        )
    if resume:
        _check_optimizer_kind(path, meta, optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(template["model"], is_loading=True,
                                                             metadata=OPTIMIZER_FORMAT)
        if meta.get("layout") == layout():
            template["rng_state"] = _rng_state()
    try:
        state = dist_checkpointing.load(template, path)
    except (Exception, CheckpointException) as err:  # the latter is a BaseException
        raise CheckpointError(
            f"checkpoint '{path}' could not be loaded into this model ({first_line(err)}); "
            "it may be truncated or corrupt, or made for another architecture"
        ) from None
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model"][f"chunk{index}"])
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        if "rng_state" in state:
            _restore_rng(state["rng_state"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    return meta


def _check_optimizer_kind(path: str, meta: dict, optimizer) -> None:
    """The distributed optimizer's states and the plain one's are stored differently."""
    saved = bool(meta.get("config", {}).get("optimizer", {}).get("distributed", False))
    here = any(isinstance(inner, DistributedOptimizer)
               for inner in getattr(optimizer, "chained_optimizers", [optimizer]))
    if saved != here:
        raise CheckpointError(
            f"'{path}' holds {'distributed' if saved else 'plain'} optimizer states; resume it "
            f"with optimizer.distributed={str(saved).lower()} (at any data-parallel size), or "
            "start from its weights with model.student_checkpoint"
        )


def _restore_rng(state: dict) -> None:
    """The RNG states of the rank that saved; the CUDA ones only where they were CUDA states.

    Why: a checkpoint written on CPU holds CPU generator states in Megatron's "CUDA" RNG tracker
    (megalign/platform/cpu.py), which a CUDA tracker cannot take, and one written on GPUs holds
    CUDA states a CPU run cannot use; resuming across the two keeps the torch CPU state only."""
    torch.set_rng_state(state["torch"])
    if (state["cuda"] is not None) != torch.cuda.is_available():
        return
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])


def describe(meta: dict) -> str:
    return json.dumps({k: meta.get(k) for k in ("iteration", "consumed_samples", "layout")})
