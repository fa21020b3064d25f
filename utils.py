"""Small helpers shared by every part of prefopt: errors, seeding, device and
dtype, atomic file writes and the metrics sink (jsonl + wandb). A leaf: it
imports nothing of prefopt. Exact memory accounting is in prefopt/memory.py."""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


class ConfigError(Exception):
    """A mistake in what the user asked for. train.py prints it as one line and
    exits with status 2 instead of showing a traceback."""

    exit_code = 2


class TrainingError(ConfigError):
    """A run that cannot go on (e.g. non-finite loss); reported in one line
    like a ConfigError, with exit status 3."""

    exit_code = 3


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was requested but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in DTYPES:
        raise ConfigError(f"precision={precision} is unknown; choose one of {', '.join(DTYPES)}")
    if device.type == "cpu" and precision != "fp32":
        # bf16 matmuls are ~160x slower than fp32 on the CPUs we test on: a run
        # would look hung. Refuse rather than silently crawl.
        raise ConfigError(f"precision={precision} on CPU is far slower than fp32; use precision=fp32 on CPU "
                          f"({precision} is for GPUs)")
    return DTYPES[precision]


# ----------------------------------------------------------------------------
# Atomic writes: a crash leaves either the old file/dir or the new one, never half.

def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: str | Path):
    """Yield a temporary directory beside `final`; on success fsync it and
    rename it to `final`. On error the temporary directory is removed and
    `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------
# Metrics sink: one JSON object per log step in <run_dir>/metrics.jsonl, and
# the same dict to wandb (offline by default, so no account or network needed).

class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_cfg, run_config: dict, run_name: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.wandb_run = None
        if wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb_run = wandb.init(
                mode=wandb_cfg.mode,
                project=wandb_cfg.project,
                group=wandb_cfg.group,
                name=run_name,
                tags=list(wandb_cfg.tags or []),
                dir=str(run_dir),
                config=run_config,
                settings=wandb.Settings(silent=True),
            )

    def log(self, metrics: dict) -> None:
        line = json.dumps(metrics) + "\n"
        try:
            self.file.write(line)
        except OSError as e:
            message = disk_full_message(e, self.path, "a line of metrics.jsonl", len(line))
            if message is None:
                raise
            raise TrainingError(f"{message}; the checkpoints are intact: free some space and resume with "
                                "resume=true (a line cut short is dropped on resume)") from None
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=metrics["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def disk_full_message(error: BaseException, path: str | Path, what: str, needed_bytes: int) -> str | None:
    """One line for a write that failed because the disk is full, else None.
    The libraries that write checkpoints report a full disk in their own words
    (safetensors: "No space left on device"; torch.save: "[enforce fail at
    inline_container.cc...]" with no errno), so a failed write also counts as
    disk-full when the space left is less than what it needed."""
    import errno

    path = Path(path).absolute()
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    full = (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
            or free < needed_bytes)
    if not full:
        return None
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return (f"disk full: writing {what} to {path} failed; the disk mounted at {mount} has {free / 2**20:.1f} MiB "
            f"free and this needs about {needed_bytes / 2**20:.1f} MiB")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error for the user and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
