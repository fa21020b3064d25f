"""Memory, exactly: bytes of live tensors (each storage counted once), peak
memory per log window, the CPU allocator setting, and the memory planner
(`plan_only=true`), which builds the model and optimizer on the meta device
and reports what a run would hold, per buffer and per rank.

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
import resource
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from utils import DTYPES, ConfigError

# ----------------------------------------------------------------------------
# Exact accounting. Everything is counted from live tensors, one storage at a
# time, so views and tied weights are never counted twice.

def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device, s.data_ptr())


def tensor_bytes(tensors) -> int:
    """Bytes held by the storages behind `tensors`, each storage counted once."""
    seen = set()
    return sum(nbytes for value in tensors for nbytes in _new_storage_bytes(value, seen))


def _new_storage_bytes(value, seen: set):
    """nbytes of each storage behind `value` (a tensor, or lists/dicts of them)
    not already in `seen`, which is updated."""
    for t in _tensors_in(value):
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            yield t.untyped_storage().nbytes()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, int]]:
    """Exact bytes of every tensor in `optimizer.state`, with a breakdown per
    state name (exp_avg, exp_avg_sq, square_avg, momentum_buffer, step, ...).
    A storage shared by two entries is counted once, under the first name.
    Most optimizers keep a dict per parameter; some also keep optimizer-wide
    entries keyed by name, which are counted under that name."""
    seen, per_name = set(), {}
    for key, state in optimizer.state.items():
        items = state.items() if isinstance(state, dict) else [(key if isinstance(key, str) else "other", state)]
        for name, value in items:
            for nbytes in _new_storage_bytes(value, seen):
                per_name[name] = per_name.get(name, 0) + nbytes
    return sum(per_name.values()), per_name


def _tensors_in(value):
    """The plain tensors that hold `value`'s memory. Tensor subclasses that
    wrap others (torchao's 4-/8-bit and fp8 optimizer state, DTensor) are
    opened up with __tensor_flatten__: their own storage is not real."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            for name in names:
                yield from _tensors_in(getattr(value, name))
        elif not value.is_meta:
            yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


class PeakMemory:
    """Peak memory since the last `read()`: max allocated on a GPU (reset after
    each read, like torchtitan's monitor); peak RSS of the process on CPU (the
    kernel cannot reset it, so on CPU this is the peak since start)."""

    def __init__(self, device: torch.device):
        self.device = device

    def read(self) -> int:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(peak)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------
# The CPU allocator.

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_cpu_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it
    back to the OS. Each training step allocates and frees the same
    activation buffers (MBs each); by default glibc serves such blocks with
    fresh mmap()s and trims the heap after frees, so every step pays page
    faults and zeroing of new pages again (~10% of a CPU step here). Blocks up
    to 32 MiB now come from the heap, which is never trimmed: the process
    keeps its peak footprint, as CUDA's caching allocator does on a GPU.
    Returns False where there is no glibc (macOS, musl): nothing changes."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 * 2**20))
    return all(mallopt(key, value) == 1 for key, value in settings)


# ----------------------------------------------------------------------------
# The planner.


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

    from prefopt.models import build_tokenizer, transformers_config

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
    from prefopt import optim as optimizers

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
    from prefopt import adapters

    model = build_meta_model(cfg)
    if adapters.enabled(cfg):   # adapters on the meta device: their shapes are all the plan needs
        model = adapters.add_adapters(model, cfg.peft, torch.device("cpu"))
    dtype_bytes = DTYPES["fp32" if cfg.precision == "auto" else cfg.precision].itemsize
    params = _unique(model.parameters())
    n_params = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    state = optimizer_state_plan(model, cfg)
    world = int(cfg.trainer.get("nproc") or 1) if cfg.trainer.name == "fsdp" else 1
    if cfg.trainer.name == "fsdp" and str(cfg.trainer.get("nproc")) == "auto":
        world = max(1, torch.cuda.device_count())
    from prefopt.losses import build_loss

    loss = build_loss(cfg.loss)
    preference = loss.two_sequences
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
        "trainable_params": sum(p.numel() for p in trainable),
        # none for SimPO, CPO, ORPO; with adapters the reference is the base with them disabled
        "reference_params_bytes": n_params * dtype_bytes if loss.needs_reference and not adapters.enabled(cfg) else 0,
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
    def gb(b):
        return f"{b / 1e9:10.3f} GB"
    lines = [f"memory plan: model={p['model']} ({p['parameters']:,} parameters), optimizer={p['optimizer']}, "
             f"precision={p['precision']}, world size {p['world_size']} (GB = 1e9 bytes)",
             f"  {'parameters':<34}{gb(p['params_bytes'])}   ({p['trainable_params']:,} trainable)",
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
