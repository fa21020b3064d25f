"""Memory planner: `python train.py model=<name> optimizer=<name> plan_only=true`.

The model is built on the `meta` device (shapes only, no memory, seconds even
for 7B parameters); the optimizer is built on it through the same registry as
a real run and takes one step on meta gradients, so its state is created
exactly as it would be, shapes and dtypes included, and counted per buffer.
Optimizers whose step cannot run on meta (it reads values, e.g. Adafactor's
`.item()`) fall back to an analytic formula in `STATE_FORMULAS`.

Activations are an estimate (documented in `activation_bytes`), not a count.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from utils import ConfigError, DTYPES


def _meta_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique(params) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def build_meta_model(cfg):
    from transformers import AutoModelForCausalLM

    from models import build_tokenizer, transformers_config

    tokenizer = build_tokenizer(cfg.model) if cfg.model.tokenizer == "bytes" else None
    config = transformers_config(cfg.model, tokenizer)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# Analytic state for optimizers that cannot step on meta tensors: bytes for one parameter.
def _adafactor_state(p: torch.Tensor) -> dict[str, int]:
    # torch.optim.Adafactor factors the second moment of a >= 2-D tensor into
    # a row vector and a column vector (over the last two dims); 1-D tensors keep it whole.
    if p.ndim >= 2:
        rows = math.prod(p.shape[:-1])
        cols = math.prod(p.shape[:-2]) * p.shape[-1]
        return {"row_var": 4 * rows, "col_var": 4 * cols, "step": 4}
    return {"variance": 4 * p.numel(), "step": 4}


STATE_FORMULAS = {"Adafactor": _adafactor_state}


def optimizer_state_plan(model, cfg) -> dict[str, int]:
    """Bytes per state buffer name, for the configured optimizer."""
    import optimizers

    name = cfg.optimizer.name
    params = _unique(p for p in model.parameters() if p.requires_grad)
    if name in STATE_FORMULAS:
        per_name: dict[str, int] = {}
        for p in params:
            for k, v in STATE_FORMULAS[name](p).items():
                per_name[k] = per_name.get(k, 0) + v
        return per_name
    opt_cfg = OmegaConf.to_container(cfg.optimizer)
    # The loop implementations run on meta tensors; fused kernels do not.
    for key in ("fused", "foreach"):
        if key in opt_cfg:
            opt_cfg[key] = False
    optimizer = optimizers.build_optimizer(model, name, opt_cfg, cfg.lr, torch.device("meta"), cfg.decay_embeddings)
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError) as e:
        raise ConfigError(f"optimizer={name} cannot be planned on the meta device ({str(e).splitlines()[0][:120]}); "
                          "add its formula to memory_plan.STATE_FORMULAS") from None
    per_name = {}
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                per_name[k] = per_name.get(k, 0) + _meta_bytes(v)
    return per_name


def activation_bytes(model_config, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """A rough estimate of the activations kept for backward, per micro-batch.

    Per decoder layer and token we count the saved inputs of the two norms,
    the q/k/v/o projections and attention output (~6 h), the MLP input, gate,
    up and activation (~h + 3 i), in the compute dtype; attention scores are
    not stored (SDPA/flash). Logits and their log-softmax gradient are fp32
    (2 x V x 4 bytes per token). With activation checkpointing only each
    layer's input is kept, plus one layer recomputed at a time.
    """
    h = model_config.hidden_size
    i = getattr(model_config, "intermediate_size", None) or 4 * h
    layers = model_config.num_hidden_layers
    vocab = model_config.vocab_size
    per_layer = tokens * (7 * h + 3 * i) * dtype_bytes
    logits = tokens * vocab * 4 * 2
    if checkpointing:
        return layers * tokens * h * dtype_bytes + per_layer + logits
    return layers * per_layer + logits


def plan(cfg) -> dict:
    model = build_meta_model(cfg)
    dtype_bytes = DTYPES["fp32" if cfg.precision == "auto" else cfg.precision].itemsize
    params = _unique(model.parameters())
    n_params = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    state = optimizer_state_plan(model, cfg)
    world = int(cfg.trainer.get("nproc") or 1) if cfg.trainer.name == "fsdp" else 1
    if cfg.trainer.name == "fsdp" and str(cfg.trainer.get("nproc")) == "auto":
        world = max(1, torch.cuda.device_count())
    preference = cfg.loss.name != "sft"
    micro = cfg.batch_size // (cfg.gradient_accumulation_steps * world)
    tokens = micro * cfg.max_length * (2 if preference else 1)
    checkpointing = bool(cfg.trainer.get("activation_checkpointing", False))
    result = {
        "model": cfg.model.name,
        "optimizer": cfg.optimizer.name,
        "parameters": n_params,
        "precision": cfg.precision,
        "world_size": world,
        "params_bytes": n_params * dtype_bytes,
        "grads_bytes": sum(p.numel() for p in trainable) * dtype_bytes,
        "reference_params_bytes": n_params * dtype_bytes if preference and not cfg.loss.get("reference_free") else 0,
        "optimizer_state_bytes": sum(state.values()),
        "optimizer_state": state,
        "activations_bytes_estimate": activation_bytes(model.config, tokens, dtype_bytes, checkpointing),
        "tokens_per_micro_batch": tokens,
    }
    sharded = ("params_bytes", "grads_bytes", "reference_params_bytes", "optimizer_state_bytes")
    result["per_rank"] = {k: math.ceil(result[k] / world) for k in sharded}
    result["per_rank"]["activations_bytes_estimate"] = result["activations_bytes_estimate"]
    result["per_rank"]["total_bytes"] = sum(result["per_rank"].values())
    return result


def format_table(p: dict) -> str:
    gb = lambda b: f"{b / 1e9:10.3f} GB"
    lines = [f"memory plan: model={p['model']} ({p['parameters']:,} parameters), optimizer={p['optimizer']}, "
             f"precision={p['precision']}, world size {p['world_size']} (GB = 1e9 bytes)",
             f"  {'parameters':<34}{gb(p['params_bytes'])}",
             f"  {'gradients':<34}{gb(p['grads_bytes'])}",
             f"  {'reference model (frozen)':<34}{gb(p['reference_params_bytes'])}",
             f"  {'optimizer state':<34}{gb(p['optimizer_state_bytes'])}"]
    for name, b in sorted(p["optimizer_state"].items()):
        lines.append(f"    {name:<32}{gb(b)}")
    lines.append(f"  {'activations (estimate)':<34}{gb(p['activations_bytes_estimate'])}"
                 f"   ({p['tokens_per_micro_batch']} tokens per micro-batch)")
    lines.append(f"  {'total per rank':<34}{gb(p['per_rank']['total_bytes'])}")
    return "\n".join(lines)


def run(cfg, run_dir: str | Path) -> dict:
    p = plan(cfg)
    print(format_table(p))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "memory_plan.json").write_text(json.dumps(p, indent=2) + "\n")
    print(f"written: {run_dir / 'memory_plan.json'}")
    return p
