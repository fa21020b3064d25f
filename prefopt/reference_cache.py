"""The reference model's log-probs, computed once and kept on disk.

With `loss.precompute_reference=true` the trainer runs the frozen reference
over every train and eval pair before training (trainers.precompute_reference).
With `reference_cache_dir` set (the default: runs/reference_cache, shared by
every run started from the same folder), those log-probs are also written to
`<reference_cache_dir>/<key>.safetensors`, and a later run whose key matches
reads them instead: it builds no reference model and runs no reference
forward at all (the second run of an optimizer sweep).

The key is a SHA-256 over everything the numbers depend on: the reference
weights (their bytes), the tokenized pairs in order (which covers the
tokenizer, the chat template and max lengths), the batch layout
(share_prompt), the dtype and device type, and loss.ld_alpha (the reference
sums are weighted by it). The file holds one (N, 2) float32 tensor, (chosen,
rejected) per pair, and in its metadata a SHA-256 of the tensor's bytes: an
entry that does not match its checksum, or has the wrong number of pairs, is
reported and recomputed. Files are written under a temporary name, fsynced and
renamed, so a crash never leaves half an entry. Only safetensors is read (no
pickle).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

FORMAT = "prefopt-reference-logps-1"


def tensor_digest(tensors) -> str:
    """SHA-256 of the bytes of `tensors`, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def cache_key(weights_digest: str, examples, settings: dict) -> str:
    """The key of one set of reference log-probs (see the module docstring)."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(weights_digest.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.chosen, ex.rejected]).encode())
    return h.hexdigest()


def entry_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"{key[:32]}.safetensors"


def read(path: Path, n_pairs: int) -> tuple[torch.Tensor | None, str | None]:
    """(the (n_pairs, 2) log-probs, None) from a good entry; (None, None) when
    there is no entry; (None, why) when it is damaged or does not fit."""
    from safetensors import safe_open

    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            logps = f.get_tensor("logps")
    except Exception as e:   # truncated, not safetensors, missing tensor
        return None, f"unreadable ({type(e).__name__})"
    if meta.get("format") != FORMAT:
        return None, f"format {meta.get('format')!r}, not {FORMAT}"
    if tuple(logps.shape) != (n_pairs, 2):
        return None, f"{tuple(logps.shape)[0] if logps.dim() else 0} pairs, not {n_pairs}"
    if tensor_digest([logps]) != meta.get("checksum"):
        return None, "checksum mismatch"
    return logps, None


def write(path: Path, logps: torch.Tensor, note: dict) -> None:
    """The entry, atomically: temporary file, fsync, rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    logps = logps.detach().to(torch.float32).cpu().contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"format": FORMAT, "checksum": tensor_digest([logps]), **{k: str(v) for k, v in note.items()}}
    save_file({"logps": logps}, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
