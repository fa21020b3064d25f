"""The memory planner (`plan_only=true`): what a run of this config holds on
each GPU, planned on the meta device (no weights read, seconds for 7B).

Exact, per rank (rank 0, the largest; see layout.py for FSDP2's padding):
parameters, gradients, optimizer state (per buffer) and the frozen
reference model. Estimated (activations.py): the activations of one
micro-batch, with and without activation checkpointing, and the workspace:
  - FSDP2 gathers whole parameters in the compute dtype: the root unit
    (embeddings, final norm, LM head) for the whole forward and backward,
    two decoder blocks at a time (the one running and the one prefetched;
    every block with reshard_after_forward=false), and in backward one block's
    unsharded gradients next to their reduce-scatter buffer;
  - the LM head's fp32 logits and their gradient (activations.logits_workspace).
The peak of a step (`Budget.total`): parameters + optimizer state + the
resident reference, plus the larger of the backward (gradients +
activations + workspace) and, with reference.offload, the reference's visit
for its forward (reference + activations, + gradients from earlier micro-batches).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import prefopt.memory.activations as act
from prefopt.memory.layout import Layout, parameter_bytes, rank0_numel, replicas, requested_ranks, shard_dims
from prefopt.memory.settings import PlanSettings, plan_settings
from prefopt.memory.sources import build_meta_model, source_name
from prefopt.memory.state import StateTensor, by_name, state_tensors
from utils import DTYPES

# ----------------------------------------------------------------------------
# What one rank holds.


@dataclass(frozen=True)
class Budget:
    """Bytes on one GPU, by part (see the module docstring for `total`)."""

    params: int
    grads: int
    optimizer: int
    reference: int                 # the frozen reference's shard, resident
    activations: int               # saved for backward (+ one recomputed block with checkpointing)
    workspace: int
    reference_visiting: int = 0    # reference.offload: on the GPU only for its forward
    grads_in_forward: int = 0      # gradient accumulation: earlier micro-batches' gradients
    cpu: int = 0                   # held in CPU memory instead (cpu_offload, reference.offload)

    @property
    def total(self) -> int:
        backward = self.grads + self.activations + self.workspace
        forward = self.reference_visiting + self.activations + self.grads_in_forward
        return self.params + self.optimizer + self.reference + max(backward, forward)

    def parts(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "reference": self.reference, "reference (visiting)": self.reference_visiting,
                "activations": self.activations, "workspace": self.workspace}


@dataclass
class ModelPlan:
    """Everything about a run's memory that does not depend on the batch: the
    meta model and its exact per-rank bytes under `layout`."""

    cfg: object
    model: torch.nn.Module
    layout: Layout
    state: list[StateTensor]
    compute_bytes: int
    geometry: act.Geometry = field(init=False)
    named: list = field(init=False)        # (name, parameter), a tied parameter once
    trainable: list = field(init=False)

    def __post_init__(self):
        self.geometry = act.Geometry.of(self.model.config)
        self.named = list(self.model.named_parameters())
        self.trainable = [(n, p) for n, p in self.named if p.requires_grad]

    # -------------------------------------------------------- whole model
    @property
    def parameters(self) -> int:
        return sum(p.numel() for _, p in self.named)

    def whole(self, named) -> int:
        return sum(p.numel() * p.element_size() for _, p in named)

    # ----------------------------------------------------------- per rank
    def rank_params(self) -> int:
        return parameter_bytes(self.named, self.layout)

    def rank_grads(self) -> int:
        return parameter_bytes(self.trainable, self.layout)

    def rank_state(self) -> dict[str, int]:
        """{buffer: rank 0's bytes}: a buffer shaped like its parameter is
        split with it, anything else is whole on every rank."""
        shapes = dict(self.named)

        def size(t: StateTensor) -> int:
            if t.param is None:
                return t.nbytes
            p = shapes[t.param]
            return t.nbytes * rank0_numel(p.shape, self.layout.shard_dims.get(t.param, 0),
                                          self.layout.shards) // p.numel()
        return by_name(self.state, size)

    def rank_reference(self) -> int:
        """A frozen twin of the policy, sharded the same way; none with
        adapters (the base is the reference) or a reference-free loss."""
        return self.rank_params() if needs_reference_model(self.cfg) else 0

    def lora_rank_sum(self) -> int:
        """The adapters' ranks in one decoder block, added up (0 without)."""
        from prefopt.model_structure import decoder_blocks

        blocks = decoder_blocks(self.model, self.model.config)
        if not blocks:
            return 0
        return sum(m.r[name] for m in blocks[0].modules() if hasattr(m, "lora_A") for name in m.lora_A)

    def workspace(self, shape: act.BatchShape) -> int:
        return self.fsdp_gathered() + act.logits_workspace(self.geometry, shape)

    def fsdp_gathered(self) -> int:
        """FSDP2's unsharded copies at the peak (module docstring); 0 for trainer=basic."""
        if not self.layout.fsdp:
            return 0
        from prefopt.model_structure import decoder_blocks

        blocks = decoder_blocks(self.model, self.model.config)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for _, p in self.named if id(p) not in in_blocks)
        sizes = sorted((sum(p.numel() for p in b.parameters()) for b in blocks), reverse=True)
        trainable = max((sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks), default=0)
        resharded = bool(self.cfg.trainer.get("reshard_after_forward", True))
        gathered = root + (sum(sizes[:2]) if resharded else sum(sizes))
        reduce_bytes = 4 if self.compute_bytes < 4 else self.compute_bytes   # reduce_dtype=fp32 under mixed precision
        return gathered * self.compute_bytes + trainable * (self.compute_bytes + reduce_bytes)

    def activations(self, shape: act.BatchShape, checkpointing: bool) -> dict[str, int]:
        return act.activation_bytes(self.geometry, shape, self.compute_bytes, checkpointing, self.lora_rank_sum())


def needs_reference_model(cfg) -> bool:
    """A frozen reference model of its own: the loss needs one and the base
    with adapters disabled does not serve."""
    from prefopt import adapters
    from prefopt.losses import build_loss

    return build_loss(cfg.loss).needs_reference and not adapters.enabled(cfg)


def storage_dtype(cfg) -> torch.dtype:
    return DTYPES["fp32" if cfg.precision == "auto" else cfg.precision]


def planned_device(cfg, settings: PlanSettings) -> str:
    """cuda when planning for GPUs (plan.gpus or plan.gpu_memory given, or a
    GPU is visible), else the device the run would use."""
    if settings.gpus is not None or settings.gpu_memory is not None:
        return "cuda"
    device = str(cfg.get("device", "auto"))
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device.split(":")[0]


def compute_dtype(cfg, layout: Layout, device: str) -> str:
    """The forward/backward dtype (a key of utils.DTYPES): the storage dtype
    for trainer=basic; trainer.mixed_precision for trainer=fsdp (auto: bf16
    on GPU, as sharding.compute_dtype)."""
    storage = "fp32" if cfg.precision == "auto" else cfg.precision
    if not layout.fsdp:
        return storage
    mixed = cfg.trainer.get("mixed_precision", "auto")
    if mixed in (None, "auto"):
        return "bf16" if device == "cuda" else storage
    return mixed


def build_model_plan(cfg, settings: PlanSettings, model: torch.nn.Module | None = None) -> ModelPlan:
    """The ModelPlan of `cfg` for plan.gpus (or the trainer's own ranks).
    `model`: its meta model, already built (the fit search plans one model
    with several optimizers: a plan leaves no state or gradients on it)."""
    ranks, fsdp = requested_ranks(cfg, settings.gpus)
    layout = Layout(ranks, replicas(cfg, ranks), fsdp)
    model = model if model is not None else build_meta_model(cfg, storage_dtype(cfg))
    if fsdp:
        layout = replace(layout, shard_dims=shard_dims(model, cfg, layout.shards))
    state = state_tensors(model, cfg)
    compute = DTYPES[compute_dtype(cfg, layout, planned_device(cfg, settings))].itemsize
    return ModelPlan(cfg, model, layout, state, compute)


# ----------------------------------------------------------------------------
# The plan of the configured run.


def micro_batch(cfg, ranks: int) -> tuple[int, str | None]:
    """Pairs per micro-batch per rank, and a note when batch_size does not
    split over the ranks and accumulation steps (the plan then takes 1)."""
    split = cfg.gradient_accumulation_steps * ranks
    if cfg.batch_size % split:
        return 1, (f"batch_size={cfg.batch_size} does not split over {ranks} ranks x "
                   f"{cfg.gradient_accumulation_steps} accumulation steps: activations planned for 1 pair per "
                   "micro-batch")
    return cfg.batch_size // split, None


def batch_shape(cfg, model_plan: ModelPlan, pairs: int) -> act.BatchShape:
    """The worst-case micro-batch of `pairs` for this loss and layout."""
    from prefopt.losses import build_loss
    from prefopt.model_structure import SHARED_PROMPT_MODELS

    config = model_plan.model.config
    shared = (bool(cfg.get("share_prompt", False)) and config.model_type in SHARED_PROMPT_MODELS
              and getattr(config, "_attn_implementation", None) == "sdpa")
    return act.worst_case_shape(pairs, cfg.max_length, build_loss(cfg.loss).two_sequences, shared)


def budget(mp: ModelPlan, shape: act.BatchShape, checkpointing: bool, reference: str, cpu_offload: bool,
           accumulation: int) -> Budget:
    """One rank's Budget for these settings. reference: model (resident),
    offload (in CPU memory, visits the GPU for its forward); precompute,
    base (peft: adapters disabled) and none (a reference-free loss) hold no
    reference model while training."""
    ref = mp.rank_reference() if reference in ("model", "offload") else 0
    grads, state = mp.rank_grads(), sum(mp.rank_state().values())
    masters = sum(p.numel() for _, p in mp.trainable) * 4 if cpu_offload else 0   # fp32 master copies
    return Budget(params=mp.rank_params(), grads=grads, optimizer=0 if cpu_offload else state,
                  reference=ref if reference == "model" else 0,
                  activations=mp.activations(shape, checkpointing)["peak"], workspace=mp.workspace(shape),
                  reference_visiting=ref if reference == "offload" else 0,
                  grads_in_forward=grads if accumulation > 1 else 0,
                  cpu=(state + masters if cpu_offload else 0) + (ref if reference == "offload" else 0))


def reference_mode(cfg, device: str) -> str:
    """model | precompute | offload | base (peft: adapters disabled) | none (reference-free loss)."""
    from prefopt import adapters
    from prefopt.losses import build_loss

    if not build_loss(cfg.loss).needs_reference:
        return "none"
    if adapters.enabled(cfg):
        return "base"
    if cfg.loss.get("precompute_reference", False):
        return "precompute"
    offload = bool((cfg.get("reference") or {}).get("offload", False)) and device == "cuda"
    return "offload" if offload else "model"


def plan(cfg) -> dict:
    """The plan of the configured run, as a JSON-ready dict: whole-model
    bytes (as before: parameters, gradients, ...), and `per_rank` for
    rank 0 of plan.gpus (or the trainer's ranks)."""
    settings = plan_settings(cfg)
    mp = build_model_plan(cfg, settings)
    device = planned_device(cfg, settings)
    pairs, note = micro_batch(cfg, mp.layout.ranks)
    shape = batch_shape(cfg, mp, pairs)
    checkpointing = bool(cfg.trainer.get("activation_checkpointing", False)) and mp.layout.fsdp
    mode = reference_mode(cfg, device)
    cpu_offload = bool(cfg.get("cpu_offload", False)) and device == "cuda" and not mp.layout.fsdp
    b = budget(mp, shape, checkpointing, mode, cpu_offload, cfg.gradient_accumulation_steps)
    plain, ckpt = mp.activations(shape, False), mp.activations(shape, True)
    state = by_name(mp.state)
    return {
        "model": cfg.model.name, "source": source_name(cfg.model), "optimizer": cfg.optimizer.name,
        "parameters": mp.parameters, "trainable_params": sum(p.numel() for _, p in mp.trainable),
        "precision": cfg.precision, "compute_dtype": compute_dtype(cfg, mp.layout, device),
        "compute_bytes": mp.compute_bytes, "device": device,
        "layout": mp.layout.describe(), "world_size": mp.layout.ranks, "ranks": mp.layout.ranks,
        "replicate": mp.layout.replicate, "shards": mp.layout.shards,
        "params_bytes": mp.whole(mp.named), "grads_bytes": mp.whole(mp.trainable),
        "reference_params_bytes": mp.whole(mp.named) if needs_reference_model(cfg) else 0,
        "optimizer_state_bytes": sum(state.values()), "optimizer_state": state,
        "batch": {"pairs_per_micro_batch": pairs, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                  "rows": shape.rows, "row_length": shape.length, "scored_tokens": shape.scored, "note": note},
        "reference": mode, "activation_checkpointing": checkpointing, "cpu_offload": cpu_offload,
        "tokens_per_micro_batch": shape.tokens,
        "per_rank": {
            "params_bytes": b.params, "grads_bytes": b.grads, "optimizer_state_bytes": sum(mp.rank_state().values()),
            "optimizer_state": mp.rank_state(), "reference_params_bytes": mp.rank_reference(),
            "activations_bytes": plain["saved"], "activations_checkpointed_bytes": ckpt["saved"],
            "activations_recompute_bytes": ckpt["recompute"], "activations_peak_bytes": b.activations,
            "workspace_bytes": b.workspace, "cpu_bytes": b.cpu, "total_bytes": b.total,
        },
    }


# ----------------------------------------------------------------------------
# Printing.


def gb(b: int) -> str:
    return f"{b / 1e9:10.3f} GB"


def format_table(p: dict) -> str:
    """The plan as a table: per rank (rank 0) and for the whole model."""
    r, batch = p["per_rank"], p["batch"]
    ckpt = "on" if p["activation_checkpointing"] else "off"
    pairs, steps = batch["pairs_per_micro_batch"], batch["gradient_accumulation_steps"]
    lines = [f"memory plan: {p['source']} ({p['parameters']:,} parameters, {p['trainable_params']:,} trainable), "
             f"optimizer={p['optimizer']}, precision={p['precision']}, compute {p['compute_dtype']} on {p['device']}",
             f"  {p['layout']}; per rank {pairs} pair{'s' * (pairs > 1)} per micro-batch x {steps} accumulation "
             f"step{'s' * (steps > 1)}, up to {batch['rows']} rows of {batch['row_length']} tokens (GB = 1e9 bytes)",
             f"  {'':<36}{'per rank':>13}{'whole model':>16}",
             _row("parameters", r["params_bytes"], p["params_bytes"]),
             _row("gradients", r["grads_bytes"], p["grads_bytes"]),
             _row("optimizer state", r["optimizer_state_bytes"], p["optimizer_state_bytes"])]
    lines += [_row(f"  {name}", r["optimizer_state"][name], b) for name, b in sorted(p["optimizer_state"].items())]
    reference = {"model": "resident", "none": "none needed", "base": "the base, adapters off"}.get(
        p["reference"], p["reference"])
    lines += [_row(f"reference model ({reference})", r["reference_params_bytes"], p["reference_params_bytes"]),
              _row("activations, no checkpointing", r["activations_bytes"]),
              _row("activations, checkpointing", r["activations_checkpointed_bytes"]),
              _row("  + one block recomputed", r["activations_recompute_bytes"]),
              _row("workspace (gathers, logits)", r["workspace_bytes"]),
              _row(f"peak per rank (checkpointing {ckpt})", r["total_bytes"])]
    if r["cpu_bytes"]:
        lines.append(_row("in CPU memory (offloaded)", r["cpu_bytes"]))
    if batch["note"]:
        lines.append(f"  note: {batch['note']}")
    return "\n".join(lines)


def _row(label: str, per_rank: int, whole: int | None = None) -> str:
    return f"  {label:<36}{gb(per_rank)}" + (f"   {gb(whole)}" if whole is not None else "")


def run(cfg, run_dir: str | Path) -> dict:
    """plan_only=true: print the plan (and, with plan.gpu_memory, what fits),
    write <run_dir>/memory_plan.json."""
    from prefopt.memory import fit

    p = plan(cfg)
    print(format_table(p))
    settings = plan_settings(cfg)
    if settings.gpu_memory is not None:
        p["fit"] = fit.search(cfg, settings)
        print(fit.format_answer(p["fit"]))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "memory_plan.json").write_text(json.dumps(p, indent=2) + "\n")
    print(f"written: {run_dir / 'memory_plan.json'}")
    return p
