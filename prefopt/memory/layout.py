"""Where a run's tensors live, per rank: FSDP2's real layout, so that the
planned bytes of rank 0 equal what `memory/*_bytes_per_rank` measures.

What FSDP2 (torch.distributed.fsdp.fully_shard) allocates on each of the S
ranks of a shard group, for a parameter sharded along dim d (0, or 1 where
a block optimizer needs it: FSDPTrainer._block_placements):
  parameters  every rank's storage is padded to rank 0's chunk,
              ceil(shape[d] / S) along d (torch.chunk sizes), even a rank
              whose chunk is shorter or empty (_fsdp_param.py);
  gradients   one reduce-scatter output per FSDP unit (a decoder block, the
              root), holding every trainable parameter's padded shard:
              the same padded sizes, in the storage dtype;
  optimizer   state made by zeros_like on the local (unpadded) shard:
              rank 0 holds the full chunk, the other ranks as much or less;
              a state tensor not shaped like its parameter (a step counter,
              Adam-mini's per-block second moments) is whole on every rank.
So rank 0 is the largest rank for every buffer, and its bytes are what the
planner reports. HSDP (trainer.replicate=R over N GPUs) shards over S = N/R
ranks and keeps R copies: per-rank bytes are those of S-way sharding.
The basic trainer is the case S = 1 (nothing padded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf


@dataclass(frozen=True)
class Layout:
    """How the planned run spreads over its GPUs."""

    ranks: int                       # processes (GPUs), N
    replicate: int = 1               # HSDP replicas, R
    fsdp: bool = False               # trainer=fsdp (the fully_shard layout, also on one rank)
    shard_dims: dict = field(default_factory=dict)   # parameter name -> sharded dim, where not 0

    @property
    def shards(self) -> int:
        """S: the ranks one parameter is split over."""
        return self.ranks // self.replicate

    def describe(self) -> str:
        if not self.fsdp:
            return "trainer=basic, 1 process"
        hsdp = f", HSDP: {self.replicate} replicas of {self.shards}-way shards" if self.replicate > 1 else ""
        return f"trainer=fsdp (FSDP2), {self.ranks} rank{'s' * (self.ranks > 1)}{hsdp}"


def rank0_numel(shape: torch.Size | tuple, dim: int, shards: int) -> int:
    """Elements of rank 0's chunk of a tensor split along `dim` over `shards`
    ranks (torch.chunk: ceil(shape[dim] / shards)), which FSDP2 pads every
    rank's parameter and gradient storage to."""
    if not shape:
        return 1
    return math.ceil(shape[dim] / shards) * math.prod(shape) // shape[dim]


def rank0_bytes(t: torch.Tensor, dim: int, shards: int) -> int:
    return rank0_numel(t.shape, dim, shards) * t.element_size()


def requested_ranks(cfg, gpus: int | None) -> tuple[int, bool]:
    """(N, fsdp): plan.gpus when given (more than one GPU means FSDP2), else
    what the trainer would start: trainer.nproc for trainer=fsdp (auto: one per
    visible GPU, at least 1), 1 for trainer=basic."""
    fsdp = cfg.trainer.name == "fsdp"
    if gpus is not None:
        return gpus, fsdp or gpus > 1
    if not fsdp:
        return 1, False
    nproc = cfg.trainer.get("nproc")
    if nproc in (None, "auto"):
        return max(1, torch.cuda.device_count()), True
    from prefopt.distributed.launch import requested_nproc

    return requested_nproc(nproc, torch.device("cpu")), True


def replicas(cfg, ranks: int) -> int:
    """trainer.replicate (HSDP), which must divide the number of GPUs."""
    from prefopt.distributed.launch import requested_replicas

    return requested_replicas(OmegaConf.select(cfg, "trainer.replicate", default=1), ranks)


def shard_dims(model: torch.nn.Module, cfg, shards: int) -> dict[str, int]:
    """{parameter name: dim} for the parameters FSDPTrainer shards along a
    dim other than 0 (Adam-mini's row blocks): asked of the trainer's own
    `_block_placements`, run on the meta model, so that plan and run agree.
    Raises its ConfigError when a tensor cannot be split over `shards`."""
    from prefopt.distributed.fsdp import FSDPTrainer

    class Probe(FSDPTrainer):
        """The trainer's placement rule without a process group: the shard
        group's size is given instead of read off a device mesh."""

        device = torch.device("meta")
        shard_size = world_size = shards

    probe = Probe(cfg, run_dir=cfg.run_dir)   # __init__ stores the config; nothing starts
    return {name: placement.dim for name, placement in probe._block_placements(model).items()}


def parameter_bytes(named: list[tuple[str, torch.Tensor]], layout: Layout) -> int:
    """Rank 0's bytes of these parameters (or of tensors laid out like them)."""
    return sum(rank0_bytes(p, layout.shard_dims.get(name, 0), layout.shards) for name, p in named)
