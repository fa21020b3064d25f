"""Block-structured optimizers (Adam-mini) on FSDP shards: the optimizer
runs on each rank's local shards, with its per-block statistics summed over
the ranks so that a block's mean is over the whole block."""
from __future__ import annotations

import torch
import torch.distributed as dist

from prefopt.distributed.sharding import local


def blocks_of(layout) -> str | int:
    """What must survive sharding: per-element second moments stay per element,
    and a blocked tensor keeps its number of blocks."""
    return "full" if layout.full else layout.num_blocks


def with_summed_block_stats(cls: type) -> type:
    """`cls` with its `block_stats` hook summing the per-block statistics (sum of
    g^2, element count) over the shard group, so a block's mean is over the
    whole block, not over this rank's slice. One all_reduce per step for all
    tensors; the counts never change and are reduced once."""

    class Sharded(cls):
        process_group = None

        def block_stats(self, grads, layouts):
            sums, counts = super().block_stats(grads, layouts)
            if self.process_group is None or dist.get_world_size(self.process_group) == 1 or not layouts:
                return sums, counts
            # the same order on every rank, whatever order the step chose
            if not hasattr(self, "_block_index"):
                self._block_index = {id(lay): i for i, lay in enumerate(self.layouts.values())}
                self._count_cache = {}
            order = sorted(range(len(layouts)), key=lambda i: self._block_index.get(id(layouts[i]), i))
            sizes = [sums[i].shape[0] for i in order]
            flat = torch.cat([sums[i].reshape(-1) for i in order])
            dist.all_reduce(flat, group=self.process_group)
            key = tuple(id(layouts[i]) for i in order)
            total_counts = self._count_cache.get(key)
            if total_counts is None:
                total_counts = torch.cat([counts[i].reshape(-1) for i in order]).clone()
                dist.all_reduce(total_counts, group=self.process_group)
                self._count_cache[key] = total_counts
            out_sums, out_counts = [None] * len(layouts), [None] * len(layouts)
            for i, s, c in zip(order, flat.split(sizes), total_counts.split(sizes)):
                out_sums[i], out_counts[i] = s.view(-1, 1), c.view(-1, 1)
            return out_sums, out_counts

    Sharded.__name__ = Sharded.__qualname__ = f"Sharded{cls.__name__}"
    return Sharded


class LocalShardOptimizer(torch.optim.Optimizer):
    """Runs an optimizer written for plain tensors on this rank's shards.

    The inner optimizer is built (by `build([(name, local shard)])`) over
    leaf tensors that share storage with the local shards of the model's
    DTensor parameters; before each step their .grad is set to the local
    gradient shards. This outer optimizer holds the DTensor parameters in the
    same groups, so LR schedules, zero_grad and torch.distributed.checkpoint
    see an ordinary optimizer: its state holds the inner state as DTensors
    (tensors shaped like the shard) or as they are (per-block statistics and
    step counters, identical on every rank), sharing storage, never copied.
    """

    def __init__(self, model: torch.nn.Module, build):
        self._pairs = [(p, local(p).detach().requires_grad_(True))
                       for p in model.parameters() if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        self.inner = build([(names[id(p)], q) for p, q in self._pairs])
        outer_of = {id(q): p for p, q in self._pairs}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [outer_of[id(q)] for q in g["params"]]}
                  for g in self.inner.param_groups]
        super().__init__(groups, dict(self.inner.defaults))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})  # lr from the scheduler, ...
        for p, q in self._pairs:
            shard = local(p)
            if q.data_ptr() != shard.data_ptr() or q.shape != shard.shape:
                q.data = shard  # FSDP re-created the shard's storage (e.g. at lazy init)
            q.grad = None if p.grad is None else local(p.grad)
        try:
            self.inner.step()
        finally:
            for _, q in self._pairs:
                q.grad = None
        self._link()
        return loss

    def _link(self) -> None:
        """Expose the inner state, keyed by the DTensor parameters."""
        from torch.distributed.tensor import DTensor

        for p, q in self._pairs:
            inner = self.inner.state.get(q)
            if not inner:
                continue
            outer = self.state[p]
            for k, v in inner.items():
                current = outer.get(k)
                if current is v or (isinstance(current, DTensor) and current.to_local() is v):
                    continue
                if torch.is_tensor(v) and v.dim() > 0 and v.shape == q.shape and isinstance(p, DTensor):
                    v = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
                outer[k] = v

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        index = {id(q): i for i, q in enumerate(q for g in self.inner.param_groups for q in g["params"])}
        inner_state = {index[id(q)]: {k: local(v) for k, v in self.state[p].items()}
                       for p, q in self._pairs if self.state.get(p)}
        groups = [{**{k: v for k, v in outer.items() if k != "params"},
                   "params": [index[id(q)] for q in inner["params"]]}
                  for outer, inner in zip(self.param_groups, self.inner.param_groups)]
        self.inner.load_state_dict({"state": inner_state, "param_groups": groups})
        self._link()
