"""Run Megatron-Core (0.16.x and 0.19.x) on machines without CUDA.

Megatron-Core hard-codes CUDA in a handful of places on the training path (scalars created with
``device="cuda"`` in the schedules and optimizer, p2p receive buffers on
``torch.cuda.current_device()``, ``Tensor.cuda()`` for shared embeddings, a CUDA RNG tracker and a
grad-clipping assert on ``torch.cuda.FloatTensor``). No configuration flag avoids them, so this
module redirects exactly those to the CPU:

* ``torch.cuda.current_device`` returns ``"cpu"`` and ``torch.cuda.synchronize`` is a no-op;
* a process-wide ``TorchFunctionMode`` rewrites ``device="cuda*"`` arguments to the CPU, drops
  ``pin_memory=True`` (the rotary embedding's context-parallel index is staged in pinned memory,
  which needs CUDA), makes ``Tensor.cuda()`` return the tensor itself, and has ``Tensor.type()``
  (no argument) name a CPU tensor by its CUDA type: the mixed-precision and distributed
  optimizers sort parameters into fp32 / bf16 groups by comparing that string with
  ``"torch.cuda.BFloat16Tensor"`` and friends;
* Megatron's RNG tracker is replaced by one that forks the CPU generator, and the "CUDA" RNG
  state that activation recomputation saves and restores around a recomputed forward is the CPU
  generator's state;
* ``clip_grad_by_total_norm_fp32`` is replaced by a CPU implementation with the same arithmetic;
* the distributed optimizer's checkpoints with torch's Adam (Megatron-Core uses Apex's or TE's
  fused Adam wherever they import, which keep the step count in the parameter groups): a fresh
  optimizer gets zero Adam states before its loading template is built (Megatron reads the step
  count from them), and loading the per-parameter states keeps the step count that loading the
  common state has already set, one tensor per parameter (Megatron copies every destination key,
  ``step`` included, from sources that never carry it, after giving all states one shared step
  tensor that torch's Adam would advance once per parameter);
* from 0.19, ``torch.cuda.current_stream`` returns the CPU's stream (whose waits are no-ops):
  the gradient buffers ask for it at every gradient reduction, to wait for CUDA-graph replays;
* ``moe_utils.te_general_gemm``, which the MoE router's gating GEMM reads but Megatron-Core
  (0.16.x) defines only when Transformer Engine imports, is defined as ``None`` (the value that
  selects the plain ``torch`` GEMM), so mixture-of-experts layers run.

It is the only place in megalign that patches anything, and ``apply()`` is called once at start-up
only when ``torch.cuda.is_available()`` is false. ``PATCHED_SITES`` lists every replaced
attribute so a test can check each still exists when the megatron-core pin moves;
``SINCE_RELEASE`` holds those a release started to need, applied only from that release on (a
test checks that Megatron-Core calls each where, and only where, it is applied).
"""

# Imports inside functions are deliberate here: Megatron-Core's modules are imported only when the
# CPU redirections are applied (without CUDA).

from __future__ import annotations

import contextlib
import importlib

import torch
from torch.overrides import TorchFunctionMode

from megalign.platform.releases import megatron_core_at_least

PATCHED_SITES = (
    "torch.cuda.current_device",
    "torch.cuda.synchronize",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker",
    "megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.sharded_state_dict",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",
)

# CUDA-only torch functions that Megatron-Core calls on the CPU training path from a release on:
# the function, the Megatron-Core module calling it, the first release that does
SINCE_RELEASE = (
    ("torch.cuda.current_stream", "megatron.core.distributed.param_and_grad_buffer", "0.19.0"),
)

# module globals Megatron-Core reads but defines only with Transformer Engine: set to None
UNDEFINED_WITHOUT_TE = ("megatron.core.transformer.moe.moe_utils.te_general_gemm",)

_CPU_COUNTERPARTS = {
    "torch.cuda.current_stream": lambda device=None: torch.cpu.current_stream(),
}


def redirections_since_release() -> list[str]:
    """The ``SINCE_RELEASE`` functions the installed Megatron-Core calls."""
    return [site for site, _, since in SINCE_RELEASE if megatron_core_at_least(since)]


_applied = False
_mode: TorchFunctionMode | None = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Sends every tensor Megatron asks to put on CUDA to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name[len("torch."):]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # staging for a host-to-CUDA copy (context parallelism)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Megatron's named RNG streams (data-parallel, model-parallel, expert) on the CPU
        generator."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)
            self._is_initialized = True

        def get_states(self):
            return {name: state.clone() for name, state in self.states_.items()}

        def set_states(self, states):
            self._is_initialized = True
            self.states_ = states

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CpuRNGStatesTracker


def _cpu_model_parallel_manual_seed(seed: int, *args, **kwargs):
    """CPU counterpart of ``model_parallel_cuda_manual_seed`` (same seed offsets)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = _cpu_rng_tracker_class()()
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(
        mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank
    )


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # a copy already


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale gradients in place by ``max_norm / total_norm`` when that is below one."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.detach().mul_(clip_coeff)


def _torch_adam_checkpoints(distributed_optimizer_class) -> None:
    sharded_state_dict = distributed_optimizer_class.sharded_state_dict
    set_states = distributed_optimizer_class._set_main_param_and_optimizer_states

    def sharded_state_dict_primed(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
        if is_loading:
            inner = self.optimizer
            for group in inner.param_groups:
                for param in group["params"]:
                    if not inner.state[param]:
                        inner.state[param] = {"step": torch.zeros(()),
                                              "exp_avg": torch.zeros_like(param),
                                              "exp_avg_sq": torch.zeros_like(param)}
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, **kwargs)

    def set_states_keeping_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            # its own copy: Megatron hands every state one shared tensor, which torch's Adam
            # would then advance once per parameter at every step
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}
        set_states(self, model_param, tensors)

    distributed_optimizer_class.sharded_state_dict = sharded_state_dict_primed
    distributed_optimizer_class._set_main_param_and_optimizer_states = set_states_keeping_step


def apply() -> None:
    """Install the CPU redirections (idempotent). Call before building any Megatron object."""
    global _applied, _mode
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megalign.platform.cpu.apply() must not be used when CUDA is available")
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    mcore_random.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    mcore_random.model_parallel_cuda_manual_seed = _cpu_model_parallel_manual_seed
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    _torch_adam_checkpoints(distrib_optimizer.DistributedOptimizer)
    for site in redirections_since_release():
        module, _, name = site.rpartition(".")
        setattr(importlib.import_module(module), name, _CPU_COUNTERPARTS[site])
    for site in UNDEFINED_WITHOUT_TE:
        module, _, name = site.rpartition(".")
        module = importlib.import_module(module)
        if not hasattr(module, name):
            setattr(module, name, None)
    _mode = _CudaToCpu()
    _mode.__enter__()
    _applied = True
