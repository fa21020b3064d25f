"""Checkpoint files: layout, RNG capture, discovery, validation and pruning.

A checkpoint is <run_dir>/checkpoints/step-<n>/ holding
  model.safetensors, config.json, tokenizer files   the Hugging Face export
  training_state.pt   optimizer, scheduler, counters, RNG, data position
  prefopt_state.json  {"step", "examples", "world_size"}, human-readable
  run_config.yaml     the resolved config of the run at that step
and <run_dir>/checkpoints/LATEST names the newest. Directories are written
under a temporary name and renamed (utils.atomic_directory), so a step-<n>
directory is either complete or absent; a damaged one (disk error, manual
edits) is detected on resume by actually loading it, and the previous one is
used instead.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from prefopt import rundir
from utils import ConfigError, TrainingError, atomic_write_text

STATE_FILE = "training_state.pt"
CONFIG_FILE = "run_config.yaml"   # the resolved config the run had when it wrote the checkpoint


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(dirs, key=step_of, reverse=True)


def write_latest(run_dir: Path, ckpt: Path) -> None:
    atomic_write_text(checkpoint_root(run_dir) / "LATEST", ckpt.name + "\n")


def latest_name(run_dir: Path) -> str | None:
    """What checkpoints/LATEST names (step-<n>), or None if there is none."""
    latest = checkpoint_root(run_dir) / "LATEST"
    return latest.read_text().strip() if latest.is_file() else None


def begin_save(run_dir: Path, step: int) -> Path:
    """The folder for step `step`'s checkpoint, recorded in the run's manifest
    before anything is written. A folder of that name that this run did not
    write is never replaced."""
    final = checkpoint_root(run_dir) / f"step-{step}"
    if final.exists() and final.name not in rundir.own_checkpoints(run_dir):
        raise TrainingError(f"{final} exists and was not written by this run; it was left as it is and no "
                            "checkpoint was saved: move it away and resume")
    rundir.record_checkpoint(run_dir, final.name)
    return final


def finish_save(run_dir: Path, final: Path, keep_last: int) -> None:
    """After the folder is complete: point LATEST at it, then prune."""
    write_latest(run_dir, final)
    prune(run_dir, keep_last)


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all). Only
    checkpoints this run wrote are candidates, and never the one LATEST names."""
    if not keep_last or keep_last <= 0:
        return
    own = rundir.own_checkpoints(run_dir)
    protected = latest_name(run_dir)
    mine = [c for c in list_checkpoints(run_dir) if c.name in own]
    old = [c for c in mine[keep_last:] if c.name != protected]
    for ckpt in old:
        shutil.rmtree(ckpt, ignore_errors=True)
    rundir.forget_checkpoints(run_dir, [c.name for c in old])


# ----------------------------------------------------------------------------
# RNG: every generator a run draws from, as plain lists so that loading needs
# no unpickling (torch.load(weights_only=True) accepts tensors, lists, dicts).

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(ckpt: Path) -> dict:
    """The training state, loaded without unpickling arbitrary objects."""
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights: the whole model, or (peft=lora/dora) its adapters."""
    from safetensors.torch import load_file

    from prefopt.adapters import ADAPTER_WEIGHTS

    whole = ckpt / "model.safetensors"
    return load_file(whole if whole.is_file() or not (ckpt / ADAPTER_WEIGHTS).is_file() else ckpt / ADAPTER_WEIGHTS)


def is_loadable(ckpt: Path) -> str | None:
    """None if the checkpoint loads, else a short reason."""
    try:
        load_model_weights(ckpt)
        load_state_file(ckpt)
        json.loads((ckpt / "prefopt_state.json").read_text())
        sharded = ckpt / "dcp" / ".metadata"   # trainer=fsdp: its index, read without unrestricted pickle
        if sharded.is_file():
            from prefopt.distributed import safe_dcp

            safe_dcp.read_metadata(sharded)
        return None
    except Exception as e:  # any damage: truncated file, bad header, missing file
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def find_resumable(run_dir: Path, warn) -> Path:
    """The newest checkpoint that loads, starting from LATEST. Damaged ones
    are reported through `warn` and skipped."""
    own = rundir.own_checkpoints(run_dir)
    candidates = [c for c in list_checkpoints(run_dir) if c.name in own]
    latest = latest_name(run_dir)
    if latest:
        named = checkpoint_root(run_dir) / latest
        if named in candidates:  # LATEST first, then older ones
            candidates = [named] + [c for c in candidates if step_of(c) < step_of(named)]
    if not candidates:
        raise ConfigError(f"resume=true but {checkpoint_root(run_dir)} has no checkpoint; "
                          "drop resume=true to start a new run there")
    for ckpt in candidates:
        problem = is_loadable(ckpt)
        if problem is None:
            return ckpt
        warn(f"warning: checkpoint {ckpt} is damaged ({problem}); trying the previous one")
    raise ConfigError(f"resume=true but no checkpoint in {checkpoint_root(run_dir)} could be loaded; "
                      "start a new run (without resume=true) or restore a checkpoint")


def truncate_metrics(path: Path, step: int, warn) -> None:
    """Drop the lines a killed run wrote after the checkpoint it resumes from,
    so that metrics.jsonl reads as one uninterrupted run. A line cut short (the
    process died, or the disk filled, mid-write) is dropped with a warning."""
    if not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            torn += bool(line.strip())
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            kept.append(line)
    if torn:
        warn(f"warning: {path} had {torn} unreadable line(s) (cut short by a crash or a full disk); dropped")
    atomic_write_text(path, "".join(line + "\n" for line in kept))
