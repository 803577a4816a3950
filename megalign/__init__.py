"""megalign: convert autoregressive LMs into masked diffusion LMs on Megatron-Core, with
REPR-ALIGN."""

__version__ = "0.1.0"

import warnings

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
