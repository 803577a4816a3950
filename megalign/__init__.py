"""megalign: convert autoregressive LMs into masked diffusion LMs on Megatron-Core, with
REPR-ALIGN."""

__version__ = "0.1.0"

import logging
import os
import warnings

# megatron-core 0.19 runs `git rev-parse` from its package directory at every import, unless this
# is set: a process per import, and inside a virtual environment within a git work tree (this
# repository's .venv) it appends that tree's commit to Megatron-Core's version
os.environ.setdefault("NO_VCS_VERSION", "1")

# Expected on CPU machines: megatron-core falls back to torch implementations without TE/apex.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")
# megatron-core's TransformerConfig default for CUDA graphs (megalign captures none)
warnings.filterwarnings("ignore", message="full scope is deprecated")
# torch's deprecations inside megatron-core's dist_checkpointing (its torch_dist load path)
warnings.filterwarnings("ignore", message=".load_state_dict. is deprecated and will be removed")
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating")
# torch 2.13 renames the collectives megatron-core's MoE token dispatcher and distributed
# optimizer call (same semantics under the new names)
warnings.filterwarnings("ignore", message=r"`torch.distributed.(all_gather_into_tensor|"
                        r"reduce_scatter_tensor)` is deprecated")

# megatron-core 0.19, each checked (docs/testing.md, "Megatron-Core releases"):
# its multimodal optimizer's config, imported by the optimizer factory megalign calls
warnings.filterwarnings("ignore", message="MimoModelConfig is experimental")
# torch's notices inside its one-process read of a checkpoint's common state
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized, assuming the intent is to load in a single process")
warnings.filterwarnings("ignore", message="The argument order of load has been changed")


class _Without(logging.Filter):
    def __init__(self, notice: str):
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.notice)


# notices megatron-core 0.19 (and NVRx under it) logs on megalign's paths, by logger
_CHECKED_NOTICES = (
    # GPTModel takes only bug fixes now (HybridModel is its successor); megalign's students and
    # teachers are GPTModels, which 0.19 trains bit for bit as 0.16.1 does
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    # logged by every synchronous save too, which 0.19 writes through that path; megalign's
    # asynchronous saves take NVRx's instead
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    # reading a checkpoint written under 0.16 (its common.pt), which 0.19 still reads
    ("megatron.core.dist_checkpointing.strategies.common", "load_common is deprecated"),
    # NVRx's writer forked per save, which megalign's asynchronous saves use on purpose: it dies
    # with its rank and starts with SIGUSR1 blocked (megalign/platform/process.py), where the
    # persistent one would be one more process per rank for the whole run
    ("nvidia_resiliency_ext.checkpointing.async_ckpt.core",
     "The TemporalAsyncCaller will be deprecated soon"),
)
for name, notice in _CHECKED_NOTICES:
    logging.getLogger(name).addFilter(_Without(notice))
del name, notice
