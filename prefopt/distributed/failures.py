"""When a rank dies: every other rank stops within seconds, and one line says which.

A rank that the kernel kills (`kill -9`, out of memory) or that goes down with
its node cannot say anything. Its peers notice at once (gloo: the TCP
connection to it is reset; NCCL: the watchdog, at the latest after
`trainer.timeout_s`), and the collective they are in raises. That error names
a socket, not a rank. To name the rank, every process that leaves the
training loop with an exception writes one key in the process group's store
(the rendezvous store that torchrun already runs; no collective of our own);
the survivors wait a few seconds for each other's keys, and the ranks that
never wrote one are the ones that died.
"""
from __future__ import annotations

import time

import torch.distributed as dist

KEY = "prefopt/left_training/{}"   # value: "lost" (a peer failed) or "error" (its own one-line error)
GRACE_S = 5.0                      # how long survivors wait for each other's keys


def _store():
    return dist.distributed_c10d._get_default_store()


def mark_left(rank: int, why: str) -> None:
    """Record that this rank left the training loop on its own (`why`:
    "lost" or "error"); never raises (the store may be gone with its node)."""
    try:
        _store().set(KEY.format(rank), why)
    except Exception:   # noqa: BLE001 - the store's host died too: nothing to record
        pass


def wait_for_peers(world_size: int, grace_s: float = GRACE_S) -> dict[int, str] | None:
    """{rank: why} of the ranks that have left the loop, read after every rank
    has written its key or `grace_s` seconds have passed: the ranks missing
    then are the dead ones. None when the store itself is unreachable (it
    lives with torchrun's agent on the rendezvous node)."""
    deadline = time.monotonic() + grace_s
    try:
        store = _store()
        while True:
            left = [r for r in range(world_size) if store.check([KEY.format(r)])]
            if len(left) == world_size or time.monotonic() >= deadline:
                return {r: store.get(KEY.format(r)).decode() for r in left}
            time.sleep(0.2)
    except Exception:   # noqa: BLE001 - DistStoreError, connection refused, ...
        return None


def explain(left: dict[int, str] | None, world_size: int, step: int) -> str | None:
    """The one line a survivor prints, or None when every rank failed the
    same way on its own (an error in the code, to be shown as it is)."""
    if left is None:
        return (f"lost contact with the rendezvous store during step {step + 1}: the node that hosts it (where "
                "the rendezvous endpoint's torchrun runs) died or is unreachable; every rank has stopped")
    dead = [r for r in range(world_size) if r not in left]
    if dead:
        who = f"rank {dead[0]}" if len(dead) == 1 else "ranks " + ", ".join(map(str, dead))
        return (f"{who} of {world_size} died during step {step + 1} without a word (killed, out of memory, or its "
                "node went down); every other rank has stopped")
    errors = [r for r, why in left.items() if why == "error"]
    if errors:
        return (f"rank {errors[0]} stopped with an error during step {step + 1} (its message is in its node's "
                "output); every other rank has stopped")
    return None


def reporter(left: dict[int, str] | None, rank: int, local_rank: int) -> bool:
    """Whether this rank prints the line: the lowest rank that lost a peer
    (every node's local rank 0 when the store is gone)."""
    if left is None:
        return local_rank == 0
    return rank == min(r for r, why in left.items() if why == "lost")
