"""Optimizer state, exactly: the configured optimizer is built through the
same registry as a run, over the meta model, and made to create its state
(shapes and dtypes, no memory), which is then counted per buffer.

How the state is created, first that applies:
  1. optimizers with a per-parameter `init_state` (bitsandbytes' 8-bit
     ones): that method, as their first step calls it (their step itself
     runs CUDA/C kernels that meta tensors cannot enter);
  2. one `step()` on meta gradients (torch.optim, Adam-mini, ...);
  3. an analytic formula in STATE_FORMULAS, for optimizers whose step reads
     values (Adafactor's `.item()`).
Anything else cannot be planned: one ConfigError line (the fit search shows
it next to that optimizer instead of stopping).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf, open_dict

from utils import ConfigError


@dataclass(frozen=True)
class StateTensor:
    """One state buffer: `param` is the name of the parameter it is shaped
    like (sharded with it under FSDP), None when it is not (a step counter,
    per-block statistics, a shared quantization map): whole on every rank."""

    name: str
    nbytes: int
    param: str | None


def _adafactor_state(p: torch.Tensor) -> dict[str, int]:
    """torch.optim.Adafactor factors the second moment of a >= 2-D tensor into
    a row vector and a column vector (over the last two dims); 1-D tensors keep it whole."""
    if p.ndim >= 2:
        rows = math.prod(p.shape[:-1])
        cols = math.prod(p.shape[:-2]) * p.shape[-1]
        return {"row_var": 4 * rows, "col_var": 4 * cols, "step": 4}
    return {"variance": 4 * p.numel(), "step": 4}


# Analytic state for optimizers that cannot step on meta tensors: bytes for one parameter.
STATE_FORMULAS = {"Adafactor": _adafactor_state}


def with_optimizer(cfg, name: str):
    """A copy of `cfg` that trains with optimizer `name`: the run's own
    optimizer settings when it is the configured one, else the registry's
    defaults (every constructor keyword; YAML tunings such as lr or
    weight_decay change no state shape)."""
    if name == cfg.optimizer.name:
        return cfg
    from prefopt import optim as optimizers

    entry = optimizers.get_entry(name)
    node = {"name": name, **(optimizers.signature_defaults(entry.target) if entry.target else {})}
    other = copy.deepcopy(cfg)
    with open_dict(other):
        other.optimizer = OmegaConf.create(node)
    return other


def state_tensors(model: torch.nn.Module, cfg) -> list[StateTensor]:
    """Every state buffer the configured optimizer creates for `model` (a
    meta model), each shared buffer once."""
    name = cfg.optimizer.name
    named = _trainable(model)
    if name in STATE_FORMULAS:
        return [StateTensor(k, v, None) for n, p in named for k, v in STATE_FORMULAS[name](p).items()]
    optimizer = _meta_optimizer(model, cfg)
    if callable(getattr(optimizer, "init_state", None)):
        _init_each(optimizer)
    else:
        _step_on_meta(optimizer, [p for _, p in named], name)
    return _collect(optimizer, {id(p): n for n, p in named})


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the trainable parameters, a tied one once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _meta_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The registry's optimizer over the meta model, with the loop (not the
    fused or foreach) kernels, which run on meta tensors."""
    from prefopt import optim as optimizers

    opt_cfg = OmegaConf.to_container(cfg.optimizer)
    for key in ("fused", "foreach"):
        if key in opt_cfg:
            opt_cfg[key] = False
    return optimizers.build_optimizer(model, cfg.optimizer.name, opt_cfg, cfg.lr, torch.device("meta"),
                                      cfg.decay_embeddings, {"max_steps": cfg.max_steps})


def _init_each(optimizer) -> None:
    """bitsandbytes: its init_state(group, p, group index, param index) for
    every parameter, what its first step does before its kernels run."""
    try:
        for gindex, group in enumerate(optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                optimizer.init_state(group, p, gindex, pindex)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError) as e:
        raise _unplannable(type(optimizer).__name__, e) from None


def _step_on_meta(optimizer, params: list[torch.Tensor], name: str) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError) as e:
        raise _unplannable(name, e) from None
    finally:
        for p in params:
            p.grad = None


def _unplannable(name: str, e: Exception) -> ConfigError:
    first = (str(e).splitlines() or [type(e).__name__])[0][:120]
    return ConfigError(f"optimizer={name} cannot be planned on the meta device ({first}); "
                       "add its formula to prefopt/memory/state.py STATE_FORMULAS")


def _collect(optimizer, names: dict[int, str]) -> list[StateTensor]:
    """The optimizer's state tensors, each object once (meta tensors have no
    storage to compare: a buffer shared by every parameter, such as
    bitsandbytes' quantization map, is one object)."""
    seen, out = set(), []
    for key, state in optimizer.state.items():
        owner = names.get(id(key))
        items = state.items() if isinstance(state, dict) else [(str(key), state)]
        for buffer, value in items:
            if not isinstance(value, torch.Tensor) or id(value) in seen:
                continue
            seen.add(id(value))
            shaped_like = owner if owner is not None and value.shape == key.shape and value.ndim else None
            out.append(StateTensor(buffer, value.numel() * value.element_size(), shaped_like))
    return out


def by_name(tensors, size=lambda t: t.nbytes) -> dict[str, int]:
    """{buffer name: bytes}, in first-seen order."""
    out: dict[str, int] = {}
    for t in tensors:
        out[t.name] = out.get(t.name, 0) + size(t)
    return out
