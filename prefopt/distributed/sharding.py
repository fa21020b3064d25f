"""FSDP2 applied in one place: `shard_model` puts `fully_shard` on each
decoder block and then on the root, with the mixed-precision policy, optional
CPU offload and optional activation checkpointing; small helpers for sharded
tensors."""
from __future__ import annotations

import torch
import torch.distributed as dist

from prefopt.model_structure import decoder_blocks
from utils import ConfigError, resolve_dtype


def shard_model(model: torch.nn.Module, mesh, *, placements: dict | None = None, reshard_after_forward: bool = True,
                param_dtype: torch.dtype | None = None, activation_checkpointing: bool = False,
                cpu_offload: bool = False) -> torch.nn.Module:
    """`fully_shard` each decoder block, then the root (embeddings, final norm,
    lm_head). `placements`: {parameter name: Shard(dim)} where dim 0 is not
    wanted. `param_dtype`: compute dtype (bf16 on GPU) with gradients reduced in
    fp32 and master weights kept in their storage dtype. Activation
    checkpointing recomputes each block in backward. `cpu_offload`: FSDP2's
    CPUOffloadPolicy (`offload_policy`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    storage = next(model.parameters()).dtype
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
          if param_dtype is not None and param_dtype != storage else MixedPrecisionPolicy())
    by_id = {id(p): placements[n] for n, p in model.named_parameters() if n in (placements or {})}
    options = dict(mesh=mesh, mp_policy=mp, offload_policy=offload_policy(cpu_offload, mesh.device_type),
                   shard_placement_fn=(lambda p: by_id.get(id(p))) if by_id else None)
    for block in decoder_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **options)
    # transformers' generate() then keeps every rank stepping until all ranks
    # are done (synced_gpus), so ranks whose answers end early do not hang the rest.
    model._is_fsdp_managed_module = True
    # model.fsdp_forward(fn) runs fn() as a forward of the root module: its
    # parameters are gathered (and, on GPU, the optimizer step is waited for)
    # even when fn calls submodules directly instead of model.forward.
    model.fsdp_forward = _call
    register_fsdp_forward_method(model, "fsdp_forward")
    return model


def _call(fn):
    return fn()


def offload_policy(cpu_offload: bool, device_type: str):
    """cpu_offload=true: FSDP2's CPUOffloadPolicy. The sharded parameters live
    in CPU memory and each block's shards are copied to the device just before
    its all-gather; gradients are copied back to CPU after the reduce-scatter,
    so the optimizer, which only ever sees the sharded parameters, creates and
    steps its state in CPU memory too (what trainer=basic's OffloadedOptimizer
    does with master copies, done by FSDP on the shards themselves). On a CPU
    run nothing moves, but FSDP takes the same code path."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return CPUOffloadPolicy(pin_memory=_pin_on_cuda(device_type)) if cpu_offload else OffloadPolicy()


def _pin_on_cuda(device_type: str) -> bool:
    """Page-locked CPU shards make the host<->GPU copies asynchronous; pinning
    needs an accelerator (a CPU-only torch raises), so CPU runs do not pin.
    GPU-only: the True branch has never run (README, "Code that has never run
    on a GPU")."""
    return device_type == "cuda"


def local(t):
    """The local shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def broadcast_object(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


CPU_BF16_WARNING = ("warning: trainer.mixed_precision=bf16 on CPU computes the forward and backward in bf16, as on "
                    "a GPU (fp32 gradient reduction, fp32 master weights and optimizer state): bf16 matmuls are "
                    "slower than fp32 on CPUs (far slower on those without bf16 instructions), so this is for "
                    "testing the GPU path; use fp32 for CPU runs")


def compute_dtype(mixed_precision, precision: str, device: torch.device) -> torch.dtype | None:
    """The forward/backward dtype: `auto` is bf16 on GPU and the storage dtype
    (`precision`) on CPU. An explicit bf16 on CPU is allowed: it is the only way
    to run FSDP's GPU default (bf16 compute, fp32 reduce and master weights)
    without a GPU (the trainer prints CPU_BF16_WARNING: it is slower). fp16
    on CPU stays refused: no GPU run defaults to it and it would only crawl.
    Storage precision (`precision`) is checked by utils.resolve_dtype, which
    refuses bf16/fp16 storage on CPU (a whole run at bf16 speed looks hung)."""
    if mixed_precision in (None, "auto"):
        mixed_precision = "bf16" if device.type == "cuda" else precision
    elif mixed_precision == "bf16" and device.type == "cpu":
        return torch.bfloat16
    elif mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("trainer.mixed_precision=fp16 on CPU is refused (far slower than fp32, and no GPU run "
                          "defaults to it); on CPU use auto/fp32, or bf16 to test the GPU's mixed-precision path")
    try:
        return resolve_dtype(mixed_precision, device)
    except ConfigError as e:
        raise ConfigError(f"trainer.mixed_precision: {e}") from None
