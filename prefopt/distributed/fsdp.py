"""FSDP trainer: the basic trainer's recipe with the models sharded by PyTorch's
FSDP2 (`torch.distributed.fsdp.fully_shard`). All FSDP-specific code lives in
this module; `FSDPTrainer` overrides only the "distributed hooks" of
`trainers.BasicTrainer`, so the training step reads the same for both.

    torchrun --nproc_per_node=8 train.py trainer=fsdp      # one process per GPU
    python train.py trainer=fsdp                           # the same: starts them itself
    python train.py trainer=fsdp trainer.nproc=2           # CPU: 2 processes, gloo, fp32

What is sharded: every parameter of the policy, its gradients and its
optimizer state (1/N per rank), one `fully_shard` group per decoder block
plus the root; the frozen reference model is sharded the same way and never
gets gradients. With `trainer.replicate=R` (HSDP, several nodes) each copy
of the model is sharded over N/R ranks and there are R copies. Precision:
master weights and optimizer state in `precision` (fp32 by default); on GPU
the forward/backward runs in bf16 by default (`trainer.mixed_precision`)
with fp32 gradient reduction (bf16 on CPU is an opt-in, to test that path).
`cpu_offload=true` is FSDP2's CPUOffloadPolicy for policy and reference.

Several nodes: the same `torchrun` line on each (docs/multinode.md). A rank
that dies is named in one line by a survivor (failures.py).

Adapters (peft=lora/dora): the PEFT wrapper's transformers model is sharded
the same way, its decoder blocks holding the trainable adapters next to the
frozen base weights (one FSDP unit, mixed requires_grad). Gradients, global
norms and optimizer state cover the adapters' shards only; the reference is
the same sharded model with its adapters disabled (no copy); dcp/ holds the
adapters' and the optimizer's shards, and the export PEFT's files
(adapter_model.safetensors + adapter_config.json, gathered to rank 0).

Optimizers: torch.optim classes run on the sharded DTensor parameters as they
are. A block-structured registry optimizer (one that exposes `block_stats`,
i.e. Adam-mini) runs on the local shards through `LocalShardOptimizer`, with
its per-block statistics summed over the ranks, and the policy is sharded
along the dimension that keeps each of its blocks on every rank. Optimizers
that need whole matrices, and any not verified on shards, are refused at
start-up (`fsdp_refusal`).

Checkpoints: <run_dir>/checkpoints/step-<n>/ holds the consolidated Hugging
Face export (rank 0, full state dict gathered), so trainer=basic and
transformers load it, plus `dcp/` (model and optimizer shards written by
every rank with torch.distributed.checkpoint) and the training state per
rank (training_state.pt for rank 0, training_state.rank<r>.pt for the others)
for an exact `resume=true`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from prefopt import adapters, checkpoints, reference_cache, rundir
from prefopt import optim as optimizers
from prefopt.config_checks import micro_batch_size
from prefopt.distributed import failures
from prefopt.distributed.launch import relaunch, requested_nproc, requested_replicas
from prefopt.distributed.sharding import CPU_BF16_WARNING, broadcast_object, compute_dtype, local, shard_model
from prefopt.optim.sharded import LocalShardOptimizer, blocks_of, with_summed_block_stats
from trainers import BasicTrainer
from utils import ConfigError, TrainingError, atomic_directory, resolve_device, resolve_dtype

FUSED_ON_DTENSOR = ("Adam", "AdamW")  # the fused optimizer kernels DTensor has sharding rules for


def fsdp_refusal(name: str) -> str | None:
    """Why optimizer `name` cannot train under trainer=fsdp (None: it can); the
    registry entry says (OptimizerEntry.fsdp)."""
    how = optimizers.get_entry(name).fsdp
    if how in (optimizers.ELEMENTWISE, optimizers.BLOCKWISE):
        return None
    return f"{how}; trainer=fsdp runs {', '.join(optimizers.fsdp_supported())}; use trainer=basic for {name}"


RANK_STATE = "training_state.rank{}.pt"  # ranks >= 1; rank 0 writes checkpoints.STATE_FILE
DCP_DIR = "dcp"


class FSDPTrainer(BasicTrainer):
    """The basic trainer with FSDP2-sharded policy and reference models."""

    # ------------------------------------------------------ process group
    def _setup_distributed(self) -> None:
        cfg = self.cfg
        device = resolve_device(cfg.device)
        self._check_supported(device)
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        nproc = requested_nproc(cfg.trainer.get("nproc"), device)
        if not launched and nproc > 1:
            micro_batch_size(cfg, nproc)   # before any process starts: batch_size must split over them
            self._replicas(nproc)
            relaunch(nproc, self.run_dir)  # never returns

        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            cfg.device = f"cuda:{local_rank}"  # one GPU per process, also for device=cuda
            device = torch.device(cfg.device)
        self._owns_process_group = not dist.is_initialized()
        if self._owns_process_group:
            backend = self._backend(device)
            timeout = timedelta(seconds=float(cfg.trainer.get("timeout_s") or 1800))
            if launched:  # torchrun (or our relaunch) set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
                dist.init_process_group(backend, timeout=timeout,
                                        device_id=device if device.type == "cuda" else None)
            else:  # one process: FSDP over a world of 1 (for comparisons of N=1 with N>1)
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.mesh = self._device_mesh(device)
        self.shard_group = self.mesh["shard"].get_group()
        self._agree_on_run_dir()
        if not self.is_main:
            sys.stdout = open(os.devnull, "w")  # one "done:" line, one progress bar; errors still reach stderr
        self._placements = {}
        self._block_optimizer = None

    def _backend(self, device: torch.device) -> str:
        """gloo on CPU, NCCL on GPUs. GPU-only (never run on a GPU): with
        cpu_offload=true the shards and their gradients are CPU tensors, which
        NCCL cannot reduce (global norm, Adam-mini's block sums), so CPU
        tensors go through gloo in the same process group."""
        if device.type != "cuda":
            return "gloo"
        return "cuda:nccl,cpu:gloo" if self.offloads else "nccl"

    def _device_mesh(self, device: torch.device):
        """FSDP: one mesh dimension ("shard") over every rank. HSDP
        (trainer.replicate=R): a 2-D mesh ("replicate", "shard") of R rows;
        torchrun numbers ranks node by node, so with one row per node each
        model is sharded inside a node and replicated across nodes, and only
        the replicas' gradient all-reduce crosses the network."""
        from torch.distributed.device_mesh import init_device_mesh

        replicate = self._replicas(self.world_size)
        if replicate == 1:
            return init_device_mesh(device.type, (self.world_size,), mesh_dim_names=("shard",))
        return init_device_mesh(device.type, (replicate, self.world_size // replicate),
                                mesh_dim_names=("replicate", "shard"))

    def _replicas(self, world_size: int) -> int:
        return requested_replicas(self.cfg.trainer.get("replicate"), world_size)

    @property
    def shard_size(self) -> int:
        """Ranks that one copy of the model is sharded over (world size unless HSDP)."""
        return self.mesh["shard"].size()

    def _check_supported(self, device: torch.device) -> None:
        """Everything that can be refused before a process starts: one line each."""
        cfg = self.cfg
        name = cfg.optimizer.name
        refusal = fsdp_refusal(name)
        if refusal:
            raise ConfigError(f"optimizer={name} cannot train under trainer=fsdp: {refusal}")
        resolve_dtype(cfg.precision, device)   # storage: bf16/fp16 on CPU refused before any process starts
        self.compute_dtype = compute_dtype(cfg.trainer.get("mixed_precision", "auto"), cfg.precision, device)
        if OmegaConf.select(cfg, "metrics.update_sparsity", default=False):
            raise ConfigError("metrics.update_sparsity=true is not available under trainer=fsdp yet (sparsity.py "
                              "compares whole tensors; a rank holds shards); use trainer=basic for it")
        if cfg.optimizer.get("fused", False) is not False and name not in FUSED_ON_DTENSOR:
            # fused=null means "fastest": DTensor has fused kernels only for Adam and AdamW
            if cfg.optimizer.fused:
                raise ConfigError(f"optimizer.fused=true: torch's DTensor has no fused {name} kernel (only "
                                  f"{' and '.join(FUSED_ON_DTENSOR)}); drop optimizer.fused under trainer=fsdp")
            cfg.optimizer.fused = False
        if adapters.enabled(cfg) and (cfg.get("export") or {}).get("merged"):
            raise ConfigError("export.merged=true is not available under trainer=fsdp yet (the merge needs the whole "
                              "base model on one rank); use trainer=basic for it, or merge a checkpoint's adapter "
                              "files with peft (PeftModel.from_pretrained(base, <checkpoint>).merge_and_unload())")

    @property
    def offloads(self) -> bool:
        """cpu_offload=true: FSDP2's CPUOffloadPolicy for the policy and the reference."""
        return bool(self.cfg.get("cpu_offload", False))

    def _offload_device(self) -> None:
        """cpu_offload=true under trainer=fsdp is FSDP2's CPUOffloadPolicy
        (sharding.offload_policy): the sharded parameters, their gradients and
        so the optimizer state are in CPU memory already, so the basic trainer's
        OffloadedOptimizer (a second, master copy) is never used here."""
        return None

    def _shard_device(self) -> torch.device:
        """Where the sharded parameters live: CPU under cpu_offload=true (FSDP2
        refuses offloaded shards anywhere else), else the training device."""
        return torch.device("cpu") if self.offloads else self.device

    def _cpu_run_notes(self) -> None:
        """One line each for the GPU paths a CPU run takes only to test them."""
        if self.device.type != "cpu":
            return
        if self.compute_dtype == torch.bfloat16:
            self.print(CPU_BF16_WARNING)
        if self.offloads:
            self.print("cpu_offload=true on CPU: FSDP's CPUOffloadPolicy is applied (the GPU path), but the shards "
                       "are in CPU memory already, so nothing moves")

    def _agree_on_run_dir(self) -> None:
        """Under a plain `torchrun`, each rank's Hydra resolved run_dir from its own
        clock; use rank 0's (and remove a folder Hydra alone created here)."""
        chosen = broadcast_object(str(self.run_dir))
        if Path(chosen) != self.run_dir:
            if self.run_dir.is_dir() and {p.name for p in self.run_dir.iterdir()} <= {".hydra"}:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = Path(chosen)
            self.cfg.run_dir = chosen

    # ------------------------------------------------------------- models
    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard the policy (called once, by the base setup, for the policy).
        With adapters (peft=lora/dora) the FSDP root is the transformers model
        inside the PEFT wrapper: its decoder blocks hold the adapters next to
        the frozen base weights (one FSDP unit each, mixed requires_grad), and
        its generate() and forward gather the root's parameters as without
        adapters. The PEFT model is returned (the policy), sharded in place."""
        self._cpu_run_notes()
        placements = self._block_placements(model)   # by the policy's parameter names
        root = adapters.base_model(model)
        names = {id(p): n for n, p in root.named_parameters()}
        self._placements = {names[id(p)]: placements[n] for n, p in model.named_parameters() if n in placements}
        shard_model(root, self.mesh, placements=self._placements,
                    reshard_after_forward=bool(self.cfg.trainer.reshard_after_forward),
                    param_dtype=self.compute_dtype, cpu_offload=self.offloads,
                    activation_checkpointing=bool(self.cfg.trainer.activation_checkpointing))
        return model

    @staticmethod
    def _root(model: torch.nn.Module) -> torch.nn.Module:
        """The module `fully_shard` was applied to last (the FSDP root)."""
        return adapters.base_model(model)

    def _unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # fully_shard keeps the model object (and its class's methods, e.g. generate)

    def _frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """The reference: an empty twin of the sharded policy, sharded the same
        way, into which each rank copies its own shards. No rank ever holds a
        second full copy of the model. Under cpu_offload=true its shards are
        offloaded as the policy's are: it never has gradients or optimizer
        state, so offloading costs it only the copy of each block's shards to
        the GPU before its all-gather (the policy pays the same every forward)
        and frees params/N of GPU memory per rank, what reference.offload=true
        does for trainer=basic, one block at a time. FSDP moves parameters
        only: the buffers (rotary frequencies) are the policy's, on its device."""
        from torch.distributed.fsdp import FSDPModule

        original_cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            twin = original_cls(copy.deepcopy(model.config)).to(next(model.parameters()).dtype)
        twin.eval().requires_grad_(False)
        shard_model(twin, self.mesh, placements=self._placements, reshard_after_forward=True,
                    param_dtype=self.compute_dtype, cpu_offload=self.offloads)
        twin.to_empty(device=self._shard_device())
        with torch.no_grad():
            for (name, mine), (other, theirs) in zip(twin.named_parameters(), model.named_parameters(), strict=True):
                assert name == other, (name, other)
                mine.to_local().copy_(theirs.to_local())
            buffers = dict(model.named_buffers())
            for name, _ in list(twin.named_buffers()):
                owner, _, leaf = name.rpartition(".")
                twin.get_submodule(owner)._buffers[leaf] = buffers[name].clone()
        return twin

    def _block_placements(self, model: torch.nn.Module) -> dict:
        """FSDP shards dim 0 by default. A block-structured optimizer (Adam-mini)
        keeps one statistic per block of rows (per attention head, per neuron);
        those tensors are sharded along dim 1 instead, so that every rank holds a
        slice of every block and a block's statistic is a plain sum over ranks."""
        cfg = self.cfg
        template = optimizers.build_optimizer(model, cfg.optimizer.name, OmegaConf.to_container(cfg.optimizer),
                                              cfg.lr, self.device, cfg.decay_embeddings)
        if not (hasattr(template, "block_stats") and hasattr(template, "layouts")):
            return {}
        from torch.distributed.tensor import Shard

        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        placements = {}
        for name, layout in template.layouts.items():
            if layout.full or layout.view_shape is None:
                continue  # per element or one block for the whole tensor: any sharding works
            if layout.cell_dim == 1:
                continue  # blocks are columns: dim-0 shards cut across every block already
            shape = shapes[name]
            if len(shape) != 2 or shape[1] % self.shard_size:
                raise ConfigError(
                    f"optimizer={cfg.optimizer.name} cannot be sharded over {self.shard_size} ranks: the blocks of "
                    f"{name} {shape} are rows, so FSDP must split its columns, which needs a 2-D tensor whose "
                    f"second dimension is a multiple of {self.shard_size}")
            placements[name] = Shard(1)
        self._block_optimizer = (type(template), template.roles,
                                 {n: blocks_of(lay) for n, lay in template.layouts.items()})
        del template  # it holds the unsharded parameters
        return placements

    def _build_optimizer(self) -> torch.optim.Optimizer:
        if self._block_optimizer is None:
            return super()._build_optimizer()  # torch.optim on DTensor parameters
        cls, roles, expected = self._block_optimizer
        cfg = self.cfg
        kwargs = optimizers.optimizer_kwargs(cfg.optimizer.name, OmegaConf.to_container(cfg.optimizer), cfg.lr,
                                             self.device)
        sharded_cls = with_summed_block_stats(cls)

        def build(named_local):
            inner = sharded_cls(named_local, roles, decay_embeddings=cfg.decay_embeddings, **kwargs)
            inner.process_group = self.shard_group   # a block's shards: one copy of the model
            got = {n: blocks_of(lay) for n, lay in inner.layouts.items()}
            if got != expected:
                bad = next(n for n in expected if got.get(n) != expected[n])
                raise ConfigError(f"optimizer={cfg.optimizer.name}: the shard of {bad} does not keep its blocks "
                                  f"({got.get(bad)} instead of {expected[bad]}); use trainer=basic")
            return inner

        try:
            return LocalShardOptimizer(self.policy, build)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimizer={cfg.optimizer.name} rejected its settings: {str(e).splitlines()[0]}")

    def forward_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], with_wpo: bool = False):
        """The basic trainer's forward, run as a forward of the sharded root:
        the log-prob function applies the LM head itself (only at scored
        positions), so it never calls model.forward, whose hooks would gather
        the root's parameters (embeddings, final norm, lm_head)."""
        return self._root(model).fsdp_forward(lambda: BasicTrainer.forward_logps(self, model, batch, with_wpo))

    def all_ranks(self, flag: bool) -> bool:
        """True on every rank when `flag` holds on every rank (one all_reduce):
        a reference-cache hit must be unanimous, or the ranks that missed would
        wait forever in a reference forward the others skip."""
        value = torch.tensor(1 if flag else 0, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def weights_digest(self, model: torch.nn.Module) -> str:
        """The digest of every rank's shards, in rank order: the same key on
        all ranks (it depends on the sharding, as the log-probs' last bits do)."""
        mine = reference_cache.tensor_digest(local(t) for t in adapters.base_tensors(model))
        digests = [None] * self.world_size
        dist.all_gather_object(digests, mine)
        return ",".join(digests)

    # ------------------------------------------------------------ failures
    def train(self) -> None:
        """The basic trainer's loop. A rank that leaves it with an exception
        says so in the store; when a peer died (or stopped with its own
        error), one survivor prints one line naming it, with where to resume
        from, and every rank exits (failures.py)."""
        try:
            super().train()
        except (ConfigError, SystemExit, KeyboardInterrupt):
            failures.mark_left(self.rank, "error")   # this rank's own one-line error (or a second Ctrl-C)
            raise
        except Exception:
            if self.world_size == 1:
                raise
            failures.mark_left(self.rank, "lost")
            left = failures.wait_for_peers(self.world_size)
            message = failures.explain(left, self.world_size, self.step)
            if message is None:
                raise   # every rank failed the same way on its own: show it as it is
            if not failures.reporter(left, self.rank, int(os.environ.get("LOCAL_RANK", 0))):
                raise SystemExit(TrainingError.exit_code) from None
            where = self.last_checkpoint()
            raise TrainingError(f"{message}. {where[0].upper()}{where[1:]}; {self.resume_hint()}") from None

    def resume_hint(self) -> str:
        """How to continue: the same launch with resume=true."""
        if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:   # torchrun's number of nodes
            return ("start the same torchrun command on every node again with resume=true "
                    f"(any number of ranks: the checkpoint is resharded); run_dir={self.run_dir}")
        command = rundir.resume_command(self.run_dir)
        nproc = "" if "trainer.nproc=" in command else f" trainer.nproc={self.world_size}"
        return f"resume with: {command}{nproc}"

    # ------------------------------------------------------ metrics, grads
    def stop_requested(self, stop) -> bool:
        """A signal seen by any rank stops every rank after the same step (one
        tiny all_reduce per step): ranks that stopped at different steps would
        wait forever in each other's collectives."""
        flag = torch.tensor(1 if stop.requested else 0, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not stop.requested:
            stop.requested = "a signal to another rank"
        return bool(stop.requested)

    def sum_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each value summed over every rank of every node: one all_reduce of
        one stacked float64 tensor (counts stay exact up to 2^53)."""
        if self.world_size == 1:
            return values
        keys = sorted(values)
        flat = torch.stack([torch.as_tensor(values[k]).to(self.device, torch.float64).reshape(()) for k in keys])
        dist.all_reduce(flat)
        return dict(zip(keys, flat.unbind()))

    def gradient_sync(self, last_micro_batch: bool):
        """Non-final micro-batches accumulate unsharded gradients locally; the
        last one reduce-scatters the sum."""
        self._root(self.policy).set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def clip_grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the sharded gradients (one all_reduce of the local
        sum of squares), then the same clipping as torch.nn.utils.clip_grad_norm_.
        Frozen parameters (the base under adapters) have no gradient."""
        grads = [local(p.grad) for p in self.policy.parameters() if p.grad is not None]
        total = self.global_norm(grads)
        if self.cfg.max_grad_norm and grads:
            coef = torch.clamp(self.cfg.max_grad_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return total

    def global_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm over the shards of one copy of the model: one all_reduce of
        the local sum of squares in the shard group (under HSDP the other
        copies hold the same values and are not counted again)."""
        shards = [local(t).detach() for t in tensors]
        sq = (torch.stack(torch._foreach_norm(shards)).float().square().sum() if shards
              else torch.zeros((), device=self.device))
        dist.all_reduce(sq, group=self.shard_group)
        return sq.sqrt()

    def reduce_memory(self, mine: dict[str, int]) -> dict[str, int]:
        """This rank's bytes summed over ranks (`memory/<x>_bytes`) and for the
        largest rank (`memory/<x>_bytes_per_rank`): two all_reduces."""
        keys = sorted(mine)
        values = torch.tensor([mine[k] for k in keys], dtype=torch.int64, device=self.device)
        total, largest = values.clone(), values.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        total, largest = dict(zip(keys, total.tolist())), dict(zip(keys, largest.tolist()))
        metrics = {}
        for k in ("params", "params_trainable", "grads", "optimizer_state", "reference_params", "peak"):
            metrics[f"memory/{k}_bytes"] = total[k]
            metrics[f"memory/{k}_bytes_per_rank"] = largest[k]
        metrics.update({f"memory/{k}_bytes": total[k] for k in keys if k.startswith("optimizer_state/")})
        return metrics

    # --------------------------------------------------------- checkpoints
    def save_model(self, directory: Path) -> None:
        """The consolidated Hugging Face export: every rank takes part in the
        gather, rank 0 (the only one holding the full tensors) writes. With
        adapters only they are gathered (ignore_frozen_params) and written in
        PEFT's format (adapter_model.safetensors + adapter_config.json), as
        trainer=basic writes them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.adapters))
        if self.is_main:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            self.policy.save_pretrained(directory, state_dict=full, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)

    def training_state(self) -> dict:
        """This rank's share of the training state: the optimizer and the model
        go through torch.distributed.checkpoint instead."""
        return {**self.progress_state(), "world_size": self.world_size, "sharded": DCP_DIR}

    def load_training_state(self, state: dict) -> None:
        self.load_progress_state(state)
        if state["world_size"] != self.world_size:
            # a partly filled log window cannot be split across another number of ranks
            self.window = defaultdict(list)
            self.print(f"warning: the checkpoint was written by {state['world_size']} ranks and is resumed on "
                       f"{self.world_size}: weights, optimizer state and data position are resharded, but the RNG "
                       "streams and a partly filled log window are not restored exactly")

    def write_checkpoint(self, final: Path) -> None:
        """All ranks write into rank 0's temporary directory (sharded model and
        optimizer with torch.distributed.checkpoint, their training state),
        rank 0 adds the Hugging Face export; after a barrier rank 0 fsyncs and
        renames it (the base class then replaces LATEST and prunes)."""
        import torch.distributed.checkpoint as dcp

        with atomic_directory(final) if self.is_main else contextlib.nullcontext() as tmp:
            tmp = Path(broadcast_object(str(tmp) if self.is_main else None))
            self.save_model(tmp)
            dcp.save(self._sharded_state(), checkpoint_id=tmp / DCP_DIR)
            state_file = tmp / (checkpoints.STATE_FILE if self.is_main else RANK_STATE.format(self.rank))
            torch.save(self.training_state(), state_file)
            if self.is_main:
                self.write_run_record(tmp)
            dist.barrier()  # every rank's files are in tmp before rank 0 fsyncs and renames it
        dist.barrier()

    def load_weights_and_state(self, ckpt: Path) -> None:
        """The sharded model and optimizer through DCP (without unrestricted
        unpickling), then this rank's training state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from prefopt.distributed import safe_dcp

        if not (ckpt / DCP_DIR / ".metadata").is_file():
            raise ConfigError(f"{ckpt} has no sharded state ({DCP_DIR}/): it was written by trainer=basic. Resume it "
                              f"with trainer=basic, or start from its weights with model.archive={ckpt}")
        state = self._sharded_state()
        safe_dcp.load(state, ckpt / DCP_DIR)
        # optimizer first: torch may initialise an empty optimizer state with a zero-lr step
        set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"])
        if self.adapters:   # the adapters alone: the frozen base was built again from model.*, as by trainer=basic
            loaded = set_model_state_dict(self.policy, state["model"], options=StateDictOptions(strict=False))
            frozen = {n for n, p in self.policy.named_parameters() if not p.requires_grad}
            if loaded.unexpected_keys or set(loaded.missing_keys) - frozen:
                raise ConfigError(f"{ckpt} holds other adapters than the configured model has (missing "
                                  f"{sorted(set(loaded.missing_keys) - frozen)[:3]}, unexpected "
                                  f"{list(loaded.unexpected_keys)[:3]}); resume with the run's own peft.* settings")
        else:
            set_model_state_dict(self.policy, state["model"])
        if self.syncs_reference:
            set_model_state_dict(self.reference, state["reference"])
        mine = ckpt / RANK_STATE.format(self.rank)
        own = mine if self.rank and mine.is_file() else ckpt / checkpoints.STATE_FILE
        self.load_training_state(torch.load(own, map_location="cpu", weights_only=True))
        dist.barrier()

    def _sharded_state(self) -> dict:
        """What DCP saves and loads: the policy's shards (with adapters: the
        adapters' shards only, the base never changes), the optimizer's, and
        TR-DPO's moving reference."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        reference = {"reference": get_model_state_dict(self.reference)} if self.syncs_reference else {}
        model = get_model_state_dict(self.policy, options=StateDictOptions(ignore_frozen_params=self.adapters))
        return {"model": model,
                "optimizer": get_optimizer_state_dict(self.policy, self.optimizer), **reference}

    # ------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        super().cleanup()
        if getattr(self, "_owns_process_group", False) and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
