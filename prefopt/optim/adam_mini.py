"""
Adam-mini: Adam with one second moment per parameter *block* instead of per
element (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More").

Update, for a parameter p with gradient g at step t (lr = group lr, wd = weight
decay, everything elementwise except the block mean):

    m   = beta1 * m + (1 - beta1) * g                    # full size, as in Adam
    v_b = beta2 * v_b + (1 - beta2) * mean_{i in b}(g_i^2)   # ONE scalar per block b
    p   = p * (1 - lr * wd)                               # decoupled decay, as AdamW
    p_i = p_i - lr * (m_i / (1 - beta1^t)) / (sqrt(v_b / (1 - beta2^t)) + eps)

"Full" tensors keep Adam's per-element v (the block is a single element); for
them this is exactly AdamW.

Partitions (which elements share a v):

  partition="paper" (default; Algorithms 2 and 4 of the paper)
    embedding, output (lm_head)  full per-element v (rows of absent tokens get
                                 zero gradient, so a mean would be biased low)
    query, key                   one v per attention head (K: num_key_value_heads blocks)
    fused qkv (GPT-2, NeoX)      split as if unfused: Q per head, K per kv head, V one block
    fused qkv bias               three blocks: the Q, K and V parts
    everything else              one v for the whole tensor (V, O, MLP matrices,
                                 norms, biases, unknown tensors)

  partition="neuron" (reproduces the official package adam-mini==1.1.1)
    embedding, output            one v per row (= per token)
    query, key                   one v per head
    value, attn_out, mlp         one v per output neuron (nn.Linear row; Conv1D column)
    fused qkv                    Q, K per head, V per output neuron
    bias                         full per-element v (plain AdamW)
    norm, other                  one v for the whole tensor

  LoRA adapters (peft=lora/dora; both partitions)
    lora_A (r x in), lora_B (out x r)   one v per row. A row of B feeds one
                                 output neuron of the frozen layer, whose
                                 weights the paper finds to form a dense
                                 Hessian block (its per-neuron rule for V and
                                 MLP); a row of A is one of the r bottleneck
                                 neurons, the same argument one level down.
                                 One v per whole matrix would tie B's rows,
                                 which start at zero and grow at very
                                 different rates. The state is tiny either way
                                 (out + r scalars per adapter). The paper
                                 (seed 003, "Other orthogonal methods")
                                 suggests Adam-mini for LoRA's Adam steps.

Weight decay: none for biases and norm gains; everything else, embeddings
included, is decayed by default (that is what the official package does;
decay_embeddings=False exempts the input embedding). A run
(optimizer=adam_mini) passes its top-level `decay_embeddings` (default false),
so embeddings are treated as with every other optimizer.

State per parameter, in self.state[p] so that state_dict()/load_state_dict()
checkpoint it: "exp_avg" (like p), "exp_avg_sq" (like p for full tensors,
otherwise (num_blocks, 1)), "step" (float32 scalar tensor on the CPU, as torch.optim.Adam),
and on the CPU single-block path with weight decay "decay_shift" (a float):
there exp_avg holds m + decay_shift * p (see _fused_decayed_step).

Speed. The optimizer step is memory bound, so what counts is how many times
each big tensor goes through memory (AdamW: read p, g, m, v; write p, m, v).
  * full tensors go through torch's fused AdamW kernel (one pass);
  * single-block tensors (most of the model in "paper" mode): a dot product
    over g for the block mean, then torch's fused SGD kernel, which with
    momentum = dampening = beta1 computes m = beta1*m + (1-beta1)*g and
    p -= s*m in one pass, s being the block's step size;
  * per-head Q/K blocks: a row-norm pass over g, then one fused SGD call per
    head (CPU) or a lerp pass for m and a broadcast addcmul pass for p batched
    with torch._foreach_* ops (GPU, and any block layout on any device).
On CPU the tensors are streamed one by one (statistics, then update, while g
is still in cache) with the block scalars as Python floats; on GPUs the block
scalars of all tensors are computed together on the device (no host sync, few
kernel launches). Decoupled weight decay needs "p = d*p - s*m", which no torch
kernel computes in one pass; on the CPU single-block path it is folded into the
fused SGD kernel's L2 term (see _fused_decayed_step; exp_avg then holds
m + decay_shift * p, decay_shift being saved in the state), elsewhere it is one
extra pass over the decayed tensors.
"""

import math
import warnings
from dataclasses import dataclass

import torch
from torch.optim.adam import adam as _adam_functional

from prefopt.optim.param_roles import ParamRole, no_decay, parameter_roles

PARTITIONS = ("paper", "neuron")
_OTHER = ParamRole("other")


# -----------------------------------------------------------------------------
# Partition: which elements of a tensor share one v

@dataclass
class BlockLayout:
    """How one parameter is cut into blocks.

    full:          Adam's per-element v (no blocks).
    num_blocks:    number of v scalars.
    view_shape:    2-D view of p / g / m in which dimension cell_dim indexes
                   "cells" (rows or columns); None: the whole tensor is one block.
    cell_dim:      0 (cells are rows) or 1 (cells are columns, e.g. Conv1D outputs).
    cell_to_block: (cells,) block id of each cell, when several cells share a
                   block (fused QKV); None when cell i is block i.
    counts:        (num_blocks, 1) float32, number of elements in each block.
    """
    full: bool
    num_blocks: int
    view_shape: tuple = None
    cell_dim: int = 0
    cell_to_block: torch.Tensor = None
    counts: torch.Tensor = None


def _full_layout(p):
    return BlockLayout(full=True, num_blocks=p.numel())


def _whole_layout(p):
    return BlockLayout(full=False, num_blocks=1,
                       counts=torch.full((1, 1), float(p.numel()), device=p.device))


def _cell_layout(p, view_shape, cell_dim, block_ids):
    """Layout from the block id of every cell (row/column of view_shape)."""
    ncells = view_shape[cell_dim]
    nb = max(block_ids) + 1
    cell_numel = p.numel() // ncells
    run = ncells // nb
    if cell_dim == 0 and run * nb == ncells and block_ids == [i // run for i in range(ncells)]:
        # equal contiguous runs of rows (per-head Q/K of an nn.Linear): viewing the
        # tensor as (num_blocks, -1) makes each block one row, no gather needed
        return BlockLayout(False, nb, (nb, p.numel() // nb), 0, None,
                           torch.full((nb, 1), float(p.numel() // nb), device=p.device))
    ids = torch.tensor(block_ids)
    counts = (torch.bincount(ids, minlength=nb) * cell_numel).float().view(nb, 1)
    index = None if block_ids == list(range(ncells)) else ids.to(p.device)
    return BlockLayout(False, nb, tuple(view_shape), cell_dim, index, counts.to(p.device))


def _neuron_block_ids(role, partition, n_out):
    """Block id for each output feature of the tensor, "full", or None (one block)."""
    r = role.role
    per_neuron = list(range(n_out))
    if r in ("lora_a", "lora_b"):
        return per_neuron   # both partitions: see LoRA in the module docstring

    def per_head():
        if role.num_heads is None or role.num_heads * role.head_dim != n_out:
            raise ValueError(f"{role} does not match {n_out} output features")
        return [i // role.head_dim for i in range(n_out)]

    def fused(v_per_neuron, bias_parts=False):
        parts = role.qkv_parts()
        if len(parts) * role.head_dim != n_out:
            raise ValueError(f"{role} does not match {n_out} output features")
        ids, nq, nk = [], 0, 0
        v_block = role.num_heads + role.num_kv_heads  # block ids: q heads, then k heads, then v
        for part in parts:
            if bias_parts:
                ids += [{"q": 0, "k": 1, "v": 2}[part]] * role.head_dim
            elif part == "q":
                ids += [nq] * role.head_dim
                nq += 1
            elif part == "k":
                ids += [role.num_heads + nk] * role.head_dim
                nk += 1
            elif v_per_neuron:
                ids += list(range(v_block, v_block + role.head_dim))
                v_block += role.head_dim
            else:
                ids += [v_block] * role.head_dim
        return ids

    if partition == "paper":
        if r in ("embedding", "output"):
            return "full"
        if r in ("query", "key"):
            return per_head()
        if r == "qkv":
            return fused(v_per_neuron=False)
        if r == "bias" and role.qkv_layout is not None:
            return fused(v_per_neuron=False, bias_parts=True)
        return None
    if partition == "neuron":
        if r == "bias":
            return "full"
        if r in ("embedding", "output", "value", "attn_out", "mlp"):
            return per_neuron
        if r in ("query", "key"):
            return per_head()
        if r == "qkv":
            return fused(v_per_neuron=True)
        return None
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")


def block_layout(p, role, partition="paper"):
    """The BlockLayout of parameter p with the given ParamRole. Falls back to
    one block for the whole tensor (with a warning) if the role's geometry does
    not fit the tensor."""
    try:
        n_out = p.shape[1 if role.transposed else 0] if p.dim() >= 1 else 1
        ids = _neuron_block_ids(role, partition, n_out)
        if ids == "full":
            return _full_layout(p)
        if ids is None or max(ids) == 0:
            return _whole_layout(p)
        if p.dim() not in (1, 2) or not p.is_contiguous():
            raise ValueError(f"cannot split a tensor of shape {tuple(p.shape)} (contiguous={p.is_contiguous()})")
        if p.dim() == 1:
            return _cell_layout(p, (p.shape[0], 1), 0, ids)
        return _cell_layout(p, tuple(p.shape), 1 if role.transposed else 0, ids)
    except ValueError as e:
        if partition not in PARTITIONS:
            raise
        warnings.warn(f"Adam-mini: {e}; using one block for the whole tensor")
        return _whole_layout(p)


# -----------------------------------------------------------------------------
# Small kernels

def _block_dtype(dtype):
    """dtype of the block statistics: at least float32. They are a few hundred
    numbers, and in fp16 a mean of g^2 (~1e-8) or eps underflows to 0."""
    return torch.promote_types(dtype, torch.float32)


def _block_sums(g, lay):
    """Per-block sum(g^2) of one gradient, as a (num_blocks, 1) tensor, >= float32."""
    if lay.view_shape is None:
        if g.dtype in (torch.float32, torch.float64):
            # a BLAS dot reads g once and needs no temporary: faster than vector_norm on CPU
            flat = g.reshape(-1)
            return torch.dot(flat, flat).view(1, 1)
        # half types: vector_norm accumulates and returns float32 without copying g
        return torch.linalg.vector_norm(g, dtype=torch.float32).square().view(1, 1)
    cells = torch.linalg.vector_norm(g.reshape(lay.view_shape), dim=1 - lay.cell_dim,
                                     dtype=_block_dtype(g.dtype)).square_()
    if lay.cell_to_block is not None:  # several rows/columns per block: add them up
        cells = cells.new_zeros(lay.num_blocks).index_add_(0, lay.cell_to_block.to(cells.device), cells)
    return cells.view(lay.num_blocks, 1)


_HAS_FUSED_SGD = hasattr(torch, "_fused_sgd_")


def _fused_ema_step(p, g, m, scale, beta1):
    """m = beta1*m + (1-beta1)*g; p -= scale*m, in one pass over memory.
    torch's fused SGD kernel computes buf = momentum*buf + (1-dampening)*g and
    p -= lr*buf; with momentum = dampening = beta1 that is exactly Adam's first
    moment and our step (is_first_step=False so buf is not overwritten by g).
    scale: a float, or a 1-element tensor (no host sync on GPU)."""
    torch._fused_sgd_([p], [g], [m], weight_decay=0.0, momentum=beta1, lr=scale,
                      dampening=beta1, nesterov=False, maximize=False, is_first_step=False)


def _fused_decayed_step(p, g, b, s, eta, beta1, shift):
    """One pass of torch's fused SGD kernel doing Adam-mini's update with
    decoupled weight decay, which would otherwise need a separate p *= 1 - eta.

    The kernel computes  g' = g + lam*p;  b = mu*b + (1-damp)*g';  p -= lr*b.
    The buffer holds b = m + shift*p (shift from the previous step, 0 at first).
    With mu = (1-eta)*beta1, 1-damp = (1-eta)*(1-beta1), lr = s/(1-eta) and
    lam = (eta/s - beta1*shift)/(1-beta1), expanding gives exactly
        m' = beta1*m + (1-beta1)*g,   p' = (1-eta)*p - s*m',
        b' = m' + (eta/s)*p',
    so the new shift is eta/s. Needs s > 0, eta < 1, beta1 > 0 (the caller checks).
    Returns the new shift."""
    lam = (eta / s - beta1 * shift) / (1.0 - beta1)
    torch._fused_sgd_([p], [g], [b], weight_decay=lam, momentum=(1.0 - eta) * beta1, lr=s / (1.0 - eta),
                      dampening=1.0 - (1.0 - eta) * (1.0 - beta1), nesterov=False, maximize=False,
                      is_first_step=False)
    return eta / s


def _unshift(p, state):
    """exp_avg back to plain m (see _fused_decayed_step)."""
    shift = state.pop("decay_shift", 0.0)
    if shift:
        state["exp_avg"].sub_(p, alpha=shift)


# -----------------------------------------------------------------------------
# The optimizer

@dataclass
class _ParamInfo:
    layout: BlockLayout
    decay: bool      # gets decoupled weight decay
    path: str        # "full", "fused", "rows" or "generic": how it is updated, see AdamMini._step_group


class AdamMini(torch.optim.Optimizer):
    """Adam-mini (see the module docstring for the update and the partitions).

    Args:
        named_params: iterable of (name, parameter), e.g. model.named_parameters().
            Parameters with requires_grad=False are ignored.
        roles: {name: ParamRole} from param_roles.parameter_roles(model). Names
            that are missing get role "other" (one v for the whole tensor).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled decay).
        partition: "paper" (default) or "neuron" (= official adam-mini 1.1.1).
        decay_embeddings: decay the input embedding (default True).

    All parameters go into one param group (so an LR scheduler sees one lr);
    the group's weight_decay is applied to every parameter except biases and
    norms (and the embedding if decay_embeddings=False): that choice is made
    per parameter from its role, not by splitting groups.
    """

    # On CPU, update big tensors one at a time right after reading their
    # gradient (see _step_streamed); False: the batched path everywhere, as on GPUs.
    stream_on_cpu = True
    # Per-tensor (or per-block) fused kernel calls cost a few microseconds each
    # (on CPU a thread fork/join each); blocks smaller than this (norm gains,
    # biases, heads of small models) are cheaper on the batched _foreach path.
    min_fused_numel = 65536

    def __init__(self, named_params, roles=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, partition="paper", decay_embeddings=True):
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        if not lr >= 0.0:
            raise ValueError(f"invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}")
        roles = roles or {}
        self.partition = partition
        self.decay_embeddings = decay_embeddings
        self.roles = {}    # name -> ParamRole
        self.layouts = {}  # name -> BlockLayout
        self._info = {}    # parameter -> _ParamInfo (tensors hash by identity)
        params = []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            role = roles.get(name, _OTHER)
            self.roles[name] = role
            self.layouts[name] = self._add_info(p, role).layout
            params.append((name, p))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__([{"params": params}], defaults)
        self._views = {}   # parameter -> cached views of p and exp_avg, see _views_of

    def _add_info(self, p, role):
        layout = block_layout(p, role, self.partition)
        fusable = _HAS_FUSED_SGD and p.device.type in ("cpu", "cuda") and p.is_contiguous()
        block_numel = p.numel() // max(layout.num_blocks, 1)
        if layout.full:
            path = "full"      # torch's AdamW kernels
        elif not fusable or block_numel < self.min_fused_numel:
            path = "generic"   # batched lerp + broadcast addcmul
        elif layout.num_blocks == 1:
            path = "fused"     # one block: torch's fused SGD kernel does m and p in one pass
        elif layout.view_shape is not None and layout.cell_dim == 0 and layout.cell_to_block is None:
            path = "rows"      # contiguous row blocks (per-head Q/K): one fused call per block on CPU
        else:
            path = "generic"
        info = self._info[p] = _ParamInfo(layout, not no_decay(role, self.decay_embeddings), path)
        return info

    def _info_of(self, p):
        info = self._info.get(p)
        if info is None:  # added later through add_param_group: no role known
            info = self._add_info(p, _OTHER)
        return info

    def partition_table(self):
        """[(name, role, kind, number of v elements)], kind in {"full", "blocks"}."""
        return [(n, self.roles[n].role, "full" if lay.full else "blocks", lay.num_blocks)
                for n, lay in self.layouts.items()]

    # FSDP HOOK -----------------------------------------------------------------
    def block_stats(self, grads, layouts):
        """Per-block sum of g^2 and element count, as lists of (num_blocks, 1) tensors.

        This is the only place where a block's elements are gathered. With a
        sharded parameter (FSDP / ZeRO) each rank holds part of a block, so a
        subclass must all-reduce (SUM) both the sums and the counts over the
        shard group here (counts are constant: reduce them once and cache),
        and the layouts must describe the local shard. Everything after this
        function is elementwise on local data.
        """
        small = [i for i, (g, lay) in enumerate(zip(grads, layouts))
                 if lay.view_shape is None and g.numel() < self.min_fused_numel]
        small_set = set(small)
        sums = [None if i in small_set else _block_sums(g, lay) for i, (g, lay) in enumerate(zip(grads, layouts))]
        if small:  # many tiny tensors (norm gains, biases): one foreach call, not one kernel each
            norms = torch._foreach_norm([grads[i] for i in small], 2, dtype=_block_dtype(grads[small[0]].dtype))
            for i, n in zip(small, torch.stack(norms).square_().view(-1, 1).split(1)):
                sums[i] = n
        return sums, [lay.counts for lay in layouts]

    # ---------------------------------------------------------------------------
    def _init_state(self, p, info):
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = (torch.zeros_like(p, memory_format=torch.preserve_format) if info.layout.full
                               else p.new_zeros(info.layout.num_blocks, 1, dtype=_block_dtype(p.dtype)))

    def _views_of(self, p, m, layout, rows):
        """Views of p and exp_avg in which the blocks are rows/columns (generic
        path), or tuples of per-block row views (rows=True). Cached, since the
        storages do not change between steps; checked by data pointer so that
        p.data = ... or load_state_dict() rebuild them."""
        key = (id(p), rows)
        cached = self._views.get(key)
        if cached is not None and cached[0] == p.data_ptr() and cached[1] == m.data_ptr():
            return cached[2], cached[3]
        if layout.view_shape is None:
            pv, mv = p, m
        else:
            pv, mv = p.view(layout.view_shape), m.view(layout.view_shape)
        if rows:
            pv, mv = pv.unbind(0), mv.unbind(0)
        self._views[key] = (p.data_ptr(), m.data_ptr(), pv, mv)
        return pv, mv

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._views.clear()
        for p, info in self._info.items():
            state = self.state.get(p, {})
            v = state.get("exp_avg_sq")
            if v is None:
                continue
            # a checkpoint written with another partition would silently misbehave
            want = tuple(p.shape) if info.layout.full else (info.layout.num_blocks, 1)
            if tuple(v.shape) != want:
                raise ValueError(f"exp_avg_sq of shape {tuple(v.shape)} in the checkpoint, expected {want}: "
                                 f"was it saved with another partition than {self.partition!r}?")
            if not info.layout.full:  # torch cast it to the parameter's dtype; block stats stay >= fp32
                state["exp_avg_sq"] = v.to(_block_dtype(p.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]

        full, blocked = [], {}  # blocked: device -> [(param, info)]
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue  # no gradient: no update, step counter unchanged (as torch Adam)
            if g.is_sparse:
                raise RuntimeError("AdamMini does not support sparse gradients")
            info = self._info.get(p) or self._info_of(p)
            if not self.state[p]:
                self._init_state(p, info)
            if info.path == "full":
                full.append(p)
            else:
                blocked.setdefault(p.device, []).append((p, info))

        # full tensors: exactly AdamW. torch's fused kernel on CPU; elsewhere the
        # foreach version, which accepts our CPU step counters. The fused CPU
        # kernel walks memory linearly and ignores strides (torch 2.13 gives
        # wrong results for a transposed .grad), so it gets contiguous tensors only.
        for decay in (True, False):
            ps = [p for p in full if self._info[p].decay == decay]
            if not ps:
                continue
            fused = all(p.device.type == "cpu" and p.is_contiguous() for p in ps)
            grads = [p.grad.contiguous() if fused else p.grad for p in ps]
            _adam_functional(
                ps, grads, [self.state[p]["exp_avg"] for p in ps],
                [self.state[p]["exp_avg_sq"] for p in ps], [], [self.state[p]["step"] for p in ps],
                foreach=not fused, fused=fused, decoupled_weight_decay=True, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd if decay else 0.0, eps=eps, maximize=False)

        # Streaming computes the block sums tensor by tensor, bypassing
        # block_stats: a subclass that overrides block_stats (e.g. to
        # all-reduce) gets the batched path, where it sees all blocks at once.
        stream = self.stream_on_cpu and type(self).block_stats is AdamMini.block_stats
        for device, items in blocked.items():
            if device.type == "cpu" and stream:
                streamed = [(p, info) for p, info in items if info.path in ("fused", "rows")
                            and p.grad.dtype == p.dtype and p.grad.is_contiguous()]
                if streamed:
                    self._step_streamed(streamed, lr, beta1, beta2, eps, wd)
                    done = {id(p) for p, _ in streamed}
                    items = [(p, info) for p, info in items if id(p) not in done]
            if items:
                self._step_blocked(items, lr, beta1, beta2, eps, wd)

    def _step_streamed(self, items, lr, beta1, beta2, eps, wd):
        """CPU, big tensors made of one block or of contiguous row blocks. Per
        tensor, read g for its block means and update m and p right away, while
        g is still in cache (this saves most of a second trip to memory for g).
        On CPU reading a tensor's value costs no device sync, so the block
        scalars are plain Python floats. On GPUs the batched path
        (_step_blocked) is used instead, to keep the number of kernel launches small."""
        steps = [self.state[p]["step"] for p, _ in items]
        torch._foreach_add_(steps, 1.0)
        for (p, info), t in zip(items, torch.stack(steps).tolist()):
            state, g, lay = self.state[p], p.grad, info.layout
            step_size, bc2_sqrt = lr / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t)
            sq = _block_sums(g, lay)  # what block_stats computes, one tensor at a time
            eta = lr * wd if info.decay else 0.0
            if info.path == "fused":
                v = beta2 * state["exp_avg_sq"].item() + (1.0 - beta2) * sq.item() / p.numel()
                state["exp_avg_sq"].fill_(v)
                s = step_size / (math.sqrt(v) / bc2_sqrt + eps)  # (lr / bc1) / (sqrt(v) / sqrt(bc2) + eps)
                if (eta or state.get("decay_shift")) and s > 0.0 and eta < 1.0 and beta1 > 0.0:
                    state["decay_shift"] = _fused_decayed_step(p, g, state["exp_avg"], s, eta, beta1,
                                                               state.get("decay_shift", 0.0))
                    continue
                _unshift(p, state)
                if eta:
                    p.mul_(1.0 - eta)  # decoupled decay, as AdamW
                _fused_ema_step(p, g, state["exp_avg"], s, beta1)
                continue
            if eta:
                p.mul_(1.0 - eta)
            n = p.numel() // lay.num_blocks  # one fused call per row block
            v = [beta2 * vo + (1.0 - beta2) * s / n
                 for vo, s in zip(state["exp_avg_sq"].view(-1).tolist(), sq.view(-1).tolist())]
            state["exp_avg_sq"].copy_(torch.tensor(v, dtype=torch.float64).view(-1, 1))
            p_rows, m_rows = self._views_of(p, state["exp_avg"], lay, rows=True)
            for pr, gr, mr, vb in zip(p_rows, g.view(lay.view_shape).unbind(0), m_rows, v):
                _fused_ema_step(pr, gr, mr, step_size / (math.sqrt(vb) / bc2_sqrt + eps), beta1)

    def _step_blocked(self, items, lr, beta1, beta2, eps, wd):
        """Adam-mini update of the blocked tensors of one device, batched.

        The optimizer step is memory bound, so each big tensor should be
        streamed through memory as few times as possible:
          fused:   one block per tensor. One dot-product pass over g, then
                   torch's fused SGD kernel updates m and p in a single pass
                   (the step size is passed as a 1-element tensor: no host sync).
          generic: several blocks (per head, per neuron, fused-QKV gathers):
                   a row/column-norm pass over g, a lerp pass for m and a
                   broadcast addcmul pass for p, batched with _foreach ops.
        """
        params = [p for p, _ in items]
        for p in params:  # a tensor that was on the streamed path before (e.g. its gradient was contiguous)
            _unshift(p, self.state[p])
        grads = [p.grad for p in params]
        paths = [info.path if (g.dtype == p.dtype and g.is_contiguous()) else "generic"
                 for (p, info), g in zip(items, grads)]
        layouts = [info.layout for _, info in items]
        states = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        sizes = [lay.num_blocks for lay in layouts]

        # The per-block quantities are tiny; an elementwise op on a list of tiny
        # tensors costs one dispatch per tensor, so they are concatenated into
        # one flat (total_blocks, 1) tensor, computed there and split back.

        # step counters (CPU scalars, as torch.optim.Adam) and bias corrections
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        ts = torch.stack(steps).tolist()
        if min(ts) == max(ts):  # the usual case: one step count for all
            bc1, bc2_sqrt = 1.0 - beta1 ** ts[0], math.sqrt(1.0 - beta2 ** ts[0])
        else:  # some tensors missed gradients at some steps: per-block corrections
            t = torch.tensor(ts, dtype=torch.float64).repeat_interleave(torch.tensor(sizes)).view(-1, 1)
            bc1 = (1.0 - beta1 ** t).to(exp_avg_sqs[0].device, torch.float32)
            bc2_sqrt = (1.0 - beta2 ** t).sqrt().to(exp_avg_sqs[0].device, torch.float32)

        # v_b = beta2 * v_b + (1 - beta2) * mean_b(g^2)
        sums, counts = self.block_stats(grads, layouts)
        v = torch.cat(exp_avg_sqs)
        mean_sq = torch.cat(sums).div_(torch.cat(counts).to(v.device))
        v.mul_(beta2).add_(mean_sq, alpha=1.0 - beta2)
        torch._foreach_copy_(exp_avg_sqs, v.split(sizes))

        # per-block step size s_b = (lr / bc1) / (sqrt(v_b) / sqrt(bc2) + eps); split
        # as 1-D (num_blocks,) tensors: a (1,) scale broadcasts against any tensor
        scales = v.sqrt_().div_(bc2_sqrt).add_(eps).reciprocal_().mul_(lr).div_(bc1).view(-1).split(sizes)

        # decoupled weight decay (before the update, as AdamW): p *= 1 - lr*wd
        if wd != 0.0:
            decayed = [p for p, info in items if info.decay]
            if decayed:
                torch._foreach_mul_(decayed, 1.0 - lr * wd)

        # m and p, in the reverse order of block_stats: the gradients read last
        # may still be in cache
        gen_p, gen_mv, gen_m, gen_g, gen_s = [], [], [], [], []
        for p, g, m, s, lay, path in reversed(list(zip(params, grads, exp_avgs, scales, layouts, paths))):
            if path == "fused":
                _fused_ema_step(p, g, m, s, beta1)
                continue
            if lay.view_shape is None:
                pv, mv = p, m
                if p.dim() == 0:
                    s = s.view(())
            else:
                pv, mv = self._views_of(p, m, lay, rows=False)
                if lay.cell_to_block is not None:
                    s = s[lay.cell_to_block.to(s.device)]  # (cells,)
                s = s.view(-1, 1) if lay.cell_dim == 0 else s.view(1, -1)  # scale rows / columns
            gen_p.append(pv)
            gen_mv.append(mv)
            gen_m.append(m)
            gen_g.append(g)
            gen_s.append(s)
        if gen_p:
            # m = lerp(m, g, 1-beta1) = beta1*m + (1-beta1)*g, then p -= s_b * m
            torch._foreach_lerp_(gen_m, gen_g, 1.0 - beta1)
            torch._foreach_addcmul_(gen_p, gen_mv, gen_s, value=-1.0)


def build_adam_mini(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                    partition="paper", decay_embeddings=True):
    """AdamMini for a Hugging Face causal LM: finds the parameter roles from the
    model's structure and wires them in. Keyword arguments come straight from
    the optimizer YAML (betas may be a list)."""
    return AdamMini(model.named_parameters(), parameter_roles(model), lr=float(lr),
                    betas=tuple(float(b) for b in betas), eps=float(eps),
                    weight_decay=float(weight_decay), partition=str(partition),
                    decay_embeddings=bool(decay_embeddings))


def official_adam_mini():
    """The official package's Adam_mini class (PyPI `adam-mini`, a test and
    benchmark dependency, importable as `adam_mini` now that ours lives at
    prefopt.optim.adam_mini), or None if it is not installed."""
    try:
        from adam_mini import Adam_mini
    except ImportError:
        return None
    return Adam_mini
