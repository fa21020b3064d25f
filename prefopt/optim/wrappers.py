"""Optimizers that wrap others: a pair of optimizers stepped as one (Muon for
hidden matrices + AdamW for the rest), and CPU offload (seed 001, OpenRLHF's
--adam_offload: the optimizer state and fp32 master weights live in CPU
memory while the model trains on the GPU)."""
from __future__ import annotations

import torch
from torch import nn

from prefopt.model_structure import embedding_weights
from utils import ConfigError


def _init_wrapper(optimizer: torch.optim.Optimizer, defaults: dict, param_groups: list) -> None:
    """What torch.optim.Optimizer.__init__ sets up, for an optimizer that
    wraps others and shares their param_groups (it must not copy them, or an
    LR schedule would not reach the inner optimizers): defaults, groups and
    the hook registries (register_step_pre_hook etc. keep working)."""
    optimizer.defaults, optimizer.param_groups = defaults, param_groups
    optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = {}, {}
    optimizer._optimizer_state_dict_pre_hooks, optimizer._optimizer_state_dict_post_hooks = {}, {}
    optimizer._optimizer_load_state_dict_pre_hooks, optimizer._optimizer_load_state_dict_post_hooks = {}, {}


class OptimizerPair(torch.optim.Optimizer):
    """Two optimizers over disjoint parameters that act as one: one step, one
    zero_grad, one state_dict, one `state` (for exact memory accounting), and
    `param_groups` shared with both, so an LR schedule drives both."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer):
        self.parts = (first, second)
        _init_wrapper(self, {}, first.param_groups + second.param_groups)

    @property
    def state(self):
        return {**self.parts[0].state, **self.parts[1].state}

    @torch.no_grad()
    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict):
        for part, sd in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(sd)


def build_muon(model: nn.Module, lr: float = 0.02, weight_decay: float = 0.1, momentum: float = 0.95,
               nesterov: bool = True, ns_coefficients: tuple = (3.4445, -4.775, 2.0315), eps: float = 1e-7,
               ns_steps: int = 5, adjust_lr_fn: str | None = "match_rms_adamw",
               adamw_betas: tuple = (0.9, 0.95), adamw_eps: float = 1e-8, adamw_weight_decay: float = 0.0):
    """torch's Muon for the hidden 2-D weight matrices, AdamW for everything
    else (embeddings, output layer, norms, biases), in one optimizer, as Muon
    is used in practice. With adjust_lr_fn="match_rms_adamw" (the default
    here) Muon's update has AdamW's RMS, so one lr serves both halves."""
    embeddings = embedding_weights(model)
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.ndim == 2 and id(p) not in embeddings]
    rest = [p for p in params if not (p.ndim == 2 and id(p) not in embeddings)]
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                            ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                            adjust_lr_fn=adjust_lr_fn)
    adamw = torch.optim.AdamW(rest, lr=lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=adamw_weight_decay)
    return OptimizerPair(muon, adamw)


class OffloadedOptimizer(torch.optim.Optimizer):
    """Wraps a freshly built optimizer so that its parameters are fp32 master
    copies on `device` (CPU): each step copies the gradients there, steps
    there (so every state tensor is created there), and copies the updated
    weights back into the model. GPU memory then holds no optimizer state."""

    def __init__(self, inner: torch.optim.Optimizer, device: str | torch.device = "cpu"):
        if any(inner.state.values()):
            raise ConfigError(f"cpu_offload=true needs an optimizer that creates its state at the first step; "
                              f"{type(inner).__name__} creates it at construction")
        self.inner, self.device = inner, torch.device(device)
        self.pairs = []                    # (model parameter, master copy)
        for group in inner.param_groups:
            masters = []
            for p in group["params"]:
                master = p.detach().to(self.device, torch.float32, copy=True).requires_grad_(p.requires_grad)
                self.pairs.append((p, master))
                masters.append(master)
            group["params"] = masters
        _init_wrapper(self, inner.defaults, inner.param_groups)

    @property
    def state(self):
        return self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.to(self.device, torch.float32)
        self.inner.step()
        for p, master in self.pairs:
            p.copy_(master, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True):
        for p, master in self.pairs:
            p.grad = master.grad = None

    def state_dict(self):
        return self.inner.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        for p, master in self.pairs:   # the model's weights were just restored: masters follow them
            master.copy_(p)
        self.inner.load_state_dict(state_dict)
