"""Fit before you run: `plan_only=true plan.gpu_memory=80GiB plan.gpus=8`
lists the settings under which the configured run fits on those GPUs, best
first, each with its per-rank memory (planner.Budget) and a rough relative
cost; and says plainly when nothing fits.

What it varies (each combination planned exactly on the meta device):
  optimizer                 plan.optimizers (those that cannot be planned or
                            cannot train under FSDP are listed with the reason)
  micro-batch               pairs per micro-batch per rank; gradient accumulation
                            makes up batch_size (only the largest micro-batch
                            that fits is listed for each combination: smaller
                            ones only cost more)
  activation checkpointing  trainer=fsdp only (also on one GPU: trainer.nproc=1)
  reference model           resident, loss.precompute_reference=true, or
                            reference.offload=true (when the loss needs one)
  CPU offload               cpu_offload=true (trainer=basic on one GPU)
  LoRA rank                 plan.lora_ranks, when peft is on

Relative cost (COST_* below): rough compute per optimizer step, in units of
one forward over the batch, relative to the cheapest setting that fits:
  policy forward + backward           3
  activation checkpointing            +1 (each block's forward runs again in backward)
  reference forward                   +1 per step (resident or offloaded; with
                                      peft: the base with adapters disabled);
                                      0 with precompute_reference, which runs it
                                      once per pair before training instead
  gradient accumulation               x (1 + 0.05 per micro-batch beyond the first):
                                      per-micro-batch overheads (FSDP gathers every
                                      block again, smaller matmuls, launches)
  reference.offload                   x 1.25 (the reference crosses PCIe each micro-batch)
  cpu_offload                         x 1.5 (the optimizer step runs on the CPU; gradients
                                      and weights cross PCIe each step)
The optimizers' own step times are taken as equal (they are small next to a
forward and backward, docs/optimizers.md). Ties go to the configured
optimizer and LoRA rank, then to the smaller peak.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf, open_dict

import prefopt.memory.planner as planner
from prefopt.memory.layout import replicas, requested_ranks
from prefopt.memory.planner import Budget, ModelPlan
from prefopt.memory.settings import PlanSettings
from prefopt.memory.sources import build_meta_model, transformers_config
from prefopt.memory.state import with_optimizer
from utils import ConfigError

COST_FORWARD_BACKWARD, COST_RECOMPUTE, COST_REFERENCE = 3.0, 1.0, 1.0
COST_PER_MICRO_BATCH, COST_REFERENCE_OFFLOAD, COST_CPU_OFFLOAD = 0.05, 1.25, 1.5
FSDP_YAML = Path(__file__).resolve().parents[2] / "config" / "trainer" / "fsdp.yaml"


@dataclass(frozen=True)
class Setting:
    """One way to run the configured training on the planned GPUs."""

    optimizer: str
    fsdp: bool
    checkpointing: bool
    reference: str           # model | precompute | offload | base (peft) | none (reference-free loss)
    cpu_offload: bool
    lora_rank: int | None
    pairs: int = 1           # per micro-batch per rank
    accumulation: int = 1

    def cost(self) -> float:
        units = COST_FORWARD_BACKWARD + COST_RECOMPUTE * self.checkpointing
        units += COST_REFERENCE * (self.reference in ("model", "offload", "base"))
        units *= 1 + COST_PER_MICRO_BATCH * (self.accumulation - 1)
        units *= COST_REFERENCE_OFFLOAD if self.reference == "offload" else 1.0
        return units * (COST_CPU_OFFLOAD if self.cpu_offload else 1.0)

    def overrides(self, cfg, gpus: int, replicate: int) -> list[str]:
        """The command-line settings that run it (a switch only where the
        configured value differs)."""
        out = []
        if self.fsdp:
            out += ["trainer=fsdp", f"trainer.nproc={gpus}"] + ([f"trainer.replicate={replicate}"] * (replicate > 1))
        elif cfg.trainer.name != "basic":
            out.append("trainer=basic")
        out += [f"optimizer={self.optimizer}", f"gradient_accumulation_steps={self.accumulation}"]
        switches = {"trainer.activation_checkpointing": self.checkpointing if self.fsdp else None,
                    "loss.precompute_reference": (self.reference == "precompute"
                                                  if "precompute_reference" in cfg.loss else None),
                    "reference.offload": self.reference == "offload", "cpu_offload": self.cpu_offload}
        for key, value in switches.items():
            if value is not None and value != bool(OmegaConf.select(cfg, key, default=False)):
                out.append(f"{key}={str(value).lower()}")
        return out + [f"peft.r={self.lora_rank}"] * (self.lora_rank is not None)

    def describe(self) -> str:
        steps = f"{self.accumulation} accumulation step{'s' * (self.accumulation > 1)}"
        parts = [self.optimizer, f"{self.pairs} pair{'s' * (self.pairs > 1)} per micro-batch x {steps}",
                 "checkpointing" if self.checkpointing else "no checkpointing",
                 {"model": "reference resident", "precompute": "reference precomputed",
                  "offload": "reference offloaded", "base": "reference = base (peft)",
                  "none": "no reference"}[self.reference]]
        parts += ["CPU offload"] * self.cpu_offload + [f"LoRA r={self.lora_rank}"] * (self.lora_rank is not None)
        return ", ".join(parts)


# ----------------------------------------------------------------------------
# The choices.


def reference_choices(cfg) -> list[str]:
    from prefopt import adapters
    from prefopt.losses import build_loss

    if not build_loss(cfg.loss).needs_reference:
        return ["none"]
    precompute = ["precompute"] if "precompute_reference" in cfg.loss else []
    if adapters.enabled(cfg):
        return ["base", *precompute]
    return ["model", *precompute, "offload"]


def trainer_choices(gpus: int) -> dict[bool, list[tuple[bool, bool]]]:
    """{fsdp: [(checkpointing, cpu_offload), ...]}: FSDP2 with or without
    checkpointing; on one GPU also the basic trainer, the one that offloads
    the optimizer to the CPU (FSDP's offload is not enabled on GPUs yet)."""
    choices = {True: [(False, False), (True, False)]}
    if gpus == 1:
        choices[False] = [(False, False), (False, True)]
    return choices


def trainer_config(cfg, fsdp: bool):
    """`cfg` with trainer=fsdp (its YAML's defaults unless it already is) or trainer=basic."""
    if fsdp == (cfg.trainer.name == "fsdp"):
        return cfg
    other = copy.deepcopy(cfg)
    with open_dict(other):
        other.trainer = OmegaConf.load(FSDP_YAML) if fsdp else OmegaConf.create({"name": "basic"})
    return other


def lora_config(cfg, rank: int | None):
    if rank is None or rank == cfg.peft.r:
        return cfg
    other = copy.deepcopy(cfg)
    other.peft.r = rank
    return other


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


# ----------------------------------------------------------------------------
# The search.


@dataclass(frozen=True)
class Option:
    setting: Setting
    budget: Budget


def search(cfg, settings: PlanSettings) -> dict:
    """The settings that fit, best first, as a JSON-ready dict (see format_answer)."""
    from prefopt import adapters

    gpus = settings.gpus or requested_ranks(cfg, None)[0]
    replicate = replicas(cfg, gpus)
    usable = int(settings.gpu_memory * (1 - settings.reserve))
    answer = {"gpus": gpus, "gpu_memory": settings.gpu_memory, "usable_bytes": usable, "fits": [], "fitting": 0,
              "not_planned": {}, "smallest": None, "nothing": None}
    if cfg.batch_size % gpus:
        answer["nothing"] = (f"batch_size={cfg.batch_size} cannot be split over {gpus} GPUs (each takes whole "
                             f"pairs); use a multiple of {gpus}")
        return answer
    config = transformers_config(cfg.model)
    ranks = (settings.lora_ranks or (cfg.peft.r,)) if adapters.enabled(cfg) else (None,)
    options, refusals = [], {}
    for rank in ranks:
        options += _options_for_rank(lora_config(cfg, rank), replace(settings, gpus=gpus), config, rank, refusals)
    planned = {o.setting.optimizer for o in options}
    answer["not_planned"] = {name: why for name, why in refusals.items() if name not in planned}
    fitting = sorted((o for o in options if o.budget.total <= usable), key=lambda o: _preference(o, cfg))
    answer["fitting"] = len(fitting)
    cheapest = min((o.setting.cost() for o in fitting), default=1.0)
    answer["fits"] = [_as_dict(o, cfg, gpus, replicate, cheapest) for o in fitting[:settings.show]]
    if not fitting:
        smallest = min(options, key=lambda o: o.budget.total, default=None)
        answer["nothing"] = (f"no setting peaks under the {size(usable)} usable per GPU" if smallest
                             else "no optimizer of plan.optimizers could be planned")
        if smallest:
            answer["smallest"] = _as_dict(smallest, cfg, gpus, replicate, smallest.setting.cost())
    return answer


def _options_for_rank(cfg, settings: PlanSettings, config, rank, refusals: dict) -> list[Option]:
    """Every (trainer, optimizer, reference) combination for one LoRA rank,
    each with the largest micro-batch that fits (or, when none does, with
    one pair per micro-batch, so that the smallest need can be reported)."""
    model = build_meta_model(cfg, planner.storage_dtype(cfg), config)
    per_rank_pairs = cfg.batch_size // settings.gpus
    usable = int(settings.gpu_memory * (1 - settings.reserve))
    options = []
    for fsdp, variants in trainer_choices(settings.gpus).items():
        for name in settings.optimizers:
            mp = _model_plan(cfg, settings, model, name, fsdp, refusals)
            for (checkpointing, cpu_offload), reference in itertools.product(
                    variants, reference_choices(cfg) if mp is not None else []):
                base = Setting(name, fsdp, checkpointing, reference, cpu_offload, rank)
                options.append(_largest_micro_batch(mp, cfg, base, per_rank_pairs, usable))
    return options


def _model_plan(cfg, settings: PlanSettings, model, name: str, fsdp: bool, refusals: dict) -> ModelPlan | None:
    """The ModelPlan for this optimizer and trainer, or None with the reason in `refusals`."""
    why = _refusal(name, fsdp)
    if why is None:
        try:
            return planner.build_model_plan(trainer_config(with_optimizer(cfg, name), fsdp), settings, model=model)
        except ConfigError as e:
            why = str(e)
    refusals.setdefault(name, why)
    return None


def _refusal(name: str, fsdp: bool) -> str | None:
    """Why optimizer `name` cannot run here (a missing package; under FSDP, not verified on shards)."""
    from prefopt import optim as optimizers

    entry = optimizers.find_entry(name)
    if entry.refuse:
        return f"cannot be used: {entry.refuse}"
    if fsdp:
        from prefopt.distributed.fsdp import fsdp_refusal

        why = fsdp_refusal(name)
        return f"cannot train under trainer=fsdp: {why.split(';')[0]}" if why else None
    return None


def _largest_micro_batch(mp: ModelPlan, cfg, base: Setting, per_rank_pairs: int, usable: int) -> Option:
    option = None
    for pairs in divisors_descending(per_rank_pairs):
        setting = replace(base, pairs=pairs, accumulation=per_rank_pairs // pairs)
        shape = planner.batch_shape(cfg, mp, pairs)
        option = Option(setting, planner.budget(mp, shape, setting.checkpointing, setting.reference,
                                                setting.cpu_offload, setting.accumulation))
        if option.budget.total <= usable:
            break
    return option


def _preference(o: Option, cfg) -> tuple:
    """Cheapest first; then the configured optimizer and LoRA rank; then the smaller peak."""
    from prefopt import adapters

    s = o.setting
    rank_gap = abs(s.lora_rank - cfg.peft.r) if adapters.enabled(cfg) and s.lora_rank is not None else 0
    return (round(s.cost(), 6), s.optimizer != cfg.optimizer.name, rank_gap, o.budget.total)


def _as_dict(o: Option, cfg, gpus: int, replicate: int, cheapest: float) -> dict:
    return {"setting": o.setting.describe(), "relative_cost": round(o.setting.cost() / cheapest, 3),
            "overrides": o.setting.overrides(cfg, gpus, replicate), "total_bytes": o.budget.total,
            "parts": o.budget.parts(), "cpu_bytes": o.budget.cpu}


# ----------------------------------------------------------------------------
# Printing.


def size(b: int) -> str:
    """Bytes in GB (1e9) or MB (1e6), whichever reads better."""
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.2f} MB"


def format_answer(a: dict) -> str:
    head = (f"fit: {a['gpus']} GPU{'s' * (a['gpus'] > 1)} of {size(a['gpu_memory'])} = "
            f"{a['gpu_memory'] / 2**30:.2f} GiB each, {size(a['usable_bytes'])} usable after plan.reserve")
    lines = [head]
    if a["fits"]:
        lines.append(f"  {a['fitting']} settings fit (each with its largest micro-batch); best first, cost relative "
                     "to the first:")
        for i, f in enumerate(a["fits"], 1):
            lines += _option_lines(i, f)
    else:
        lines.append(f"  NOTHING FITS: {a['nothing']}.")
        if a["smallest"]:
            lines.append("  the smallest setting would need:")
            lines += _option_lines(0, a["smallest"])
            lines.append("  try more GPUs (plan.gpus), peft=lora, a shorter max_length or a smaller batch_size")
    for name, reason in a["not_planned"].items():
        lines.append(f"  not planned: {name}: {reason}")
    return "\n".join(lines)


def _option_lines(i: int, f: dict) -> list[str]:
    parts = " + ".join(f"{k} {size(v)}" for k, v in f["parts"].items() if v)
    cpu = f"; in CPU memory {size(f['cpu_bytes'])}" if f["cpu_bytes"] else ""
    label = f"{i:2d}." if i else "   "
    return [f"  {label} cost {f['relative_cost']:.2f}x, peak {size(f['total_bytes'])} per GPU: {f['setting']}",
            f"        {parts}{cpu}",
            f"        {' '.join(f['overrides'])}"]
