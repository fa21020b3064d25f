"""Memory, exactly: bytes of live tensors (each storage counted once), peak
memory per log window, and the CPU allocator setting. Used by every trainer
for its `memory/*` metrics; the planner's figures are checked against them."""
from __future__ import annotations

import resource
import sys

import torch

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
