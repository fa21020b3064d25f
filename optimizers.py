"""The optimizer registry: one place that turns `optimizer=<name>` into an
optimizer object, its Hydra config node, its parameter groups and its LR
schedule.

Names resolve in this order:
  1. explicit registry entries (`EXTRA_OPTIMIZERS`, e.g. adam_mini),
  2. any `torch.optim.Optimizer` subclass, by `getattr(torch.optim, name)`.
An unknown name is a one-line `ConfigError` that lists every valid name.

Every keyword of an optimizer's constructor becomes a key of the `optimizer`
config node (generated from its signature), so `optimizer.<keyword>=<value>`
works on the command line for every optimizer, with or without a YAML file.
YAMLs in config/optimizer/ exist only for optimizers with tuned defaults.
"""
from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from utils import ConfigError


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one named optimizer.

    target:  the class or function whose keyword arguments are the config keys.
    build:   (model, kwargs, decay_embeddings) -> torch.optim.Optimizer;
             kwargs include lr.
    refuse:  if set, why this optimizer cannot train in prefopt (one line).
    """

    name: str
    target: Callable
    build: Callable[[nn.Module, dict, bool], torch.optim.Optimizer]
    refuse: str | None = None


# Optimizers torch ships that cannot work in a plain loss.backward(); step() loop.
TORCH_REFUSALS = {
    "SparseAdam": "SparseAdam only accepts sparse gradients (nn.Embedding(sparse=True)); transformer weights get dense gradients. Use Adam or AdamW",
    "LBFGS": "LBFGS needs a closure that re-evaluates the loss several times per step, which a preference-training step does not provide. Use AdamW, RMSprop or SGD",
}


def _torch_optimizer_classes() -> dict[str, type]:
    return {
        name: obj for name in dir(torch.optim)
        if inspect.isclass(obj := getattr(torch.optim, name))
        and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }


def _build_torch(cls: type) -> Callable:
    def build(model: nn.Module, kwargs: dict, decay_embeddings: bool) -> torch.optim.Optimizer:
        return cls(parameter_groups(model, kwargs.get("weight_decay"), decay_embeddings), **kwargs)

    return build


def _build_adam_mini(model: nn.Module, kwargs: dict, decay_embeddings: bool) -> torch.optim.Optimizer:
    from adam_mini import build_adam_mini

    return build_adam_mini(model, **kwargs)


def _adam_mini_target():
    from adam_mini import build_adam_mini

    return build_adam_mini


# Entries outside torch.optim. `target` is resolved lazily so that importing
# this module stays cheap.
EXTRA_OPTIMIZERS: dict[str, tuple[Callable, Callable]] = {
    "adam_mini": (_adam_mini_target, _build_adam_mini),
}


def registry() -> dict[str, OptimizerEntry]:
    entries = {}
    for name, cls in _torch_optimizer_classes().items():
        entries[name] = OptimizerEntry(name, cls, _build_torch(cls), TORCH_REFUSALS.get(name))
    for name, (target, build) in EXTRA_OPTIMIZERS.items():
        try:
            entries[name] = OptimizerEntry(name, target(), build)
        except ImportError as e:  # an optional package is missing: say which
            entries[name] = OptimizerEntry(name, None, build, f"it needs the package '{e.name}' (pip install {e.name})")
    return entries


def get_entry(name: str) -> OptimizerEntry:
    entries = registry()
    if name not in entries:
        raise ConfigError(unknown_name_message("optimizer", name, sorted(entries)))
    entry = entries[name]
    if entry.refuse:
        raise ConfigError(f"optimizer={name} cannot be used: {entry.refuse}")
    return entry


def unknown_name_message(group: str, name: str, valid: list[str]) -> str:
    lowered = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    hint = f" (did you mean {lowered[close[0]]}?)" if close else ""
    return f"unknown {group} '{name}'{hint}; valid names: {', '.join(valid)}"


# ----------------------------------------------------------------------------
# Config nodes from signatures.

def signature_defaults(target: Callable) -> dict:
    """Constructor keywords and their defaults, as plain config values. `params`
    and `lr` are left out: parameters come from the model, lr is the top-level
    `lr` key so that `lr=...` on the command line always wins."""
    node = {}
    for key, p in inspect.signature(target).parameters.items():
        if key in ("self", "params", "model", "named_params", "lr") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(default, torch.Tensor):
            default = default.item()
        node[key] = default
    return node


def register_configs() -> None:
    """Put one config node per optimizer name in Hydra's ConfigStore:
    `optimizer_base/<name>` holds every keyword with its default, and
    `optimizer/<name>` selects it, unless config/optimizer/<name>.yaml exists
    (those YAMLs extend `optimizer_base/<name>` with tuned values)."""
    from pathlib import Path

    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    yaml_dir = Path(__file__).parent / "config" / "optimizer"
    for name, entry in registry().items():
        node = {"name": name, **(signature_defaults(entry.target) if entry.target else {})}
        store.store(group="optimizer_base", name=name, node=node)
        if not (yaml_dir / f"{name}.yaml").exists():
            store.store(group="optimizer", name=name, node={"optimizer": node}, package="_global_")


def optimizer_kwargs(name: str, opt_cfg: dict, lr: float, device: torch.device) -> dict:
    """The keyword arguments for the constructor: config values with lists
    turned back into tuples where the signature uses tuples, and the fastest
    implementation torch has on this device unless the user chose one."""
    target = get_entry(name).target
    params = inspect.signature(target).parameters
    kwargs = {"lr": lr}
    for key, value in opt_cfg.items():
        if key == "name":
            continue
        if key not in params:
            valid = [k for k in signature_defaults(target)]
            raise ConfigError(f"optimizer.{key} is not a keyword of {name}; valid keywords: {', '.join(valid)}")
        if isinstance(value, list) and isinstance(params[key].default, tuple):
            value = tuple(value)
        kwargs[key] = value
    if "fused" in kwargs and kwargs["fused"] is None and not kwargs.get("differentiable"):
        # Fused kernels exist for Adam, AdamW, SGD and Adagrad on CPU and CUDA;
        # they are the fastest path and numerically equal to the loop version.
        kwargs["fused"] = device.type in ("cpu", "cuda") and not kwargs.get("capturable", False)
    return kwargs


def build_optimizer(model: nn.Module, name: str, opt_cfg: dict, lr: float, device: torch.device,
                    decay_embeddings: bool = False) -> torch.optim.Optimizer:
    entry = get_entry(name)
    kwargs = optimizer_kwargs(name, opt_cfg, lr, device)
    try:
        return entry.build(model, kwargs, decay_embeddings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer={name} rejected its settings: {str(e).splitlines()[0]}")


# ----------------------------------------------------------------------------
# Parameter groups, built in one place: weight decay for weight matrices only.
# Biases and norm gains are 1-D (decaying them just fights the normalisation),
# and embeddings hold rare-token rows that decay would pull to zero, so they
# are excluded unless `decay_embeddings` is set.

def parameter_groups(model: nn.Module, weight_decay: float | None, decay_embeddings: bool) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": params}]
    embeddings = set()
    if not decay_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                embeddings.add(id(module.weight))
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in embeddings]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------
# Learning-rate schedules: a multiplier on the optimizer's lr per step.

def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over `warmup_steps`, then
    constant: 1;  linear: down to 0 at `total_steps`;  cosine: half a cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = ("constant", "linear", "cosine")


def build_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    if schedule not in SCHEDULES:
        raise ConfigError(f"scheduler={schedule} is unknown; choose one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, schedule, warmup_steps, total_steps))
