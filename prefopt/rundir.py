"""The run directory: who may write it, what this run wrote, what a resume may change.

A run directory belongs to one prefopt run. `claim_run_dir` is called once,
before any model or data is built:

- it refuses a folder that already holds files this run did not write
  (someone's folder, another run's checkpoints), unless it is a prefopt run
  being resumed (`resume=true`);
- it takes an OS file lock (`.prefopt.lock`, holding the pid) for the whole
  run, so a second run started in the same folder is refused in one line; the
  kernel drops the lock when the process dies, so a `kill -9` never blocks a
  resume;
- it removes temporary files and folders a killed save left behind;
- on resume it compares the new config with the one the run recorded:
  keys that cannot change mid-run are refused by name, the others are
  accepted and written down.

`prefopt_run.json` (the manifest) lists the checkpoints this run wrote and the
config changes made at each resume. Pruning (`keep_last`) deletes only
checkpoints the manifest lists.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from utils import ConfigError, atomic_write_text

MANIFEST = "prefopt_run.json"
LOCK = ".prefopt.lock"
HYDRA_DIR = ".hydra"      # Hydra writes its own record here before our code runs
CLAIMED_ENV = "PREFOPT_RUN_DIR_CLAIMED"   # set for worker processes whose launcher holds the lock

# Keys a resume may change: when and how often things happen, not what is
# computed. Everything else (lr, optimizer, loss, data, batch size, seed,
# model, precision, ...) would mix two runs in one, and is refused.
CHANGEABLE_ON_RESUME = ("max_steps", "log_every", "eval_every", "save_every", "keep_last", "resume", "run_dir",
                        "nonfinite", "compile", "keep_cpu_memory", "eval_batch_size", "trainer.nproc",
                        "trainer.replicate", "trainer.timeout_s",
                        "reference_cache_dir")
CHANGEABLE_PREFIXES = ("wandb.", "divergence.", "hydra.")


# ----------------------------------------------------------------------------
# The manifest.

def manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / MANIFEST


def read_manifest(run_dir: Path) -> dict | None:
    path = manifest_path(run_dir)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("checkpoints"), list):
            raise ValueError("no checkpoint list")
        return manifest
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); it lists what this run wrote, so nothing was deleted. "
                          "Restore it or start a new run_dir") from None


def write_manifest(run_dir: Path, manifest: dict) -> None:
    atomic_write_text(manifest_path(run_dir), json.dumps(manifest, indent=1) + "\n")


def own_checkpoints(run_dir: Path) -> set[str]:
    """Names (step-<n>) of the checkpoints this run wrote."""
    manifest = read_manifest(run_dir)
    return set(manifest["checkpoints"]) if manifest else set()


def record_checkpoint(run_dir: Path, name: str) -> None:
    """Called before a checkpoint is written, so a folder of that name is
    always one this run may replace or delete."""
    manifest = read_manifest(run_dir) or new_manifest()
    if name not in manifest["checkpoints"]:
        manifest["checkpoints"].append(name)
        write_manifest(run_dir, manifest)


def forget_checkpoints(run_dir: Path, names: list[str]) -> None:
    manifest = read_manifest(run_dir)
    manifest["checkpoints"] = [n for n in manifest["checkpoints"] if n not in names]
    write_manifest(run_dir, manifest)


def new_manifest() -> dict:
    return {"format": 1, "checkpoints": [], "resumes": []}


# ----------------------------------------------------------------------------
# Claiming the folder.

_held_lock = None   # the open lock file: kept open (and locked) until the process ends


def claim_run_dir(cfg) -> None:
    """Check, lock and tidy `cfg.run_dir` for this run (see the module doc)."""
    run_dir = Path(cfg.run_dir)
    if os.environ.get(CLAIMED_ENV) == str(run_dir.absolute()) or int(os.environ.get("RANK", "0")) != 0:
        return  # our launcher (or rank 0 under torchrun) holds it
    run_dir.mkdir(parents=True, exist_ok=True)
    _lock(run_dir)
    manifest = read_manifest(run_dir)
    if cfg.resume:
        manifest = manifest or _adopt_legacy_run(run_dir)
        check_resume_config(cfg, run_dir, manifest)
    else:
        _refuse_used_dir(run_dir, manifest)
        write_manifest(run_dir, new_manifest())
    _remove_stale_temporaries(run_dir)
    os.environ[CLAIMED_ENV] = str(run_dir.absolute())


def _lock(run_dir: Path) -> None:
    import fcntl

    global _held_lock
    path = run_dir / LOCK
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"run_dir={run_dir} is in use by another prefopt run (pid {holder}); wait for it to "
                          "finish or choose another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_lock = f


def _refuse_used_dir(run_dir: Path, manifest: dict | None) -> None:
    if manifest is not None:
        from prefopt.checkpoints import latest_name

        latest = latest_name(run_dir)
        where = f" (last checkpoint {latest})" if latest else ""
        raise ConfigError(f"run_dir={run_dir} already holds a prefopt run{where}; add resume=true to continue it, "
                          "or choose a new run_dir")
    found = sorted(p.name for p in run_dir.iterdir() if p.name not in (HYDRA_DIR, LOCK))
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"run_dir={run_dir} is not empty ({shown}) and is not a prefopt run; a run writes and "
                          "prunes files there, so choose a new or empty run_dir")


def _adopt_legacy_run(run_dir: Path) -> dict:
    """A run written before the manifest existed: its checkpoints are the
    step-<n> folders that carry prefopt's own state file."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"resume=true but run_dir={run_dir} is not a prefopt run (no {MANIFEST} or config.yaml); "
                          "drop resume=true and choose a new run_dir")
    manifest = new_manifest()
    root = run_dir / "checkpoints"
    if root.is_dir():
        manifest["checkpoints"] = sorted(p.name for p in root.iterdir() if (p / "prefopt_state.json").is_file())
    write_manifest(run_dir, manifest)
    return manifest


def _remove_stale_temporaries(run_dir: Path) -> None:
    """`.<name>.tmp-<pid>` files and folders are what atomic writes leave when
    the process is killed mid-write; with the lock held, none is in use."""
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# What a resume may change.

def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changeable(key: str) -> bool:
    return key in CHANGEABLE_ON_RESUME or key.startswith(CHANGEABLE_PREFIXES)


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for keys set in both configs that differ.
    A key only one side has is a key added or removed between versions."""
    old, new = _flat(old), _flat(new)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def _recorded_config(run_dir: Path) -> Path | None:
    """The config of the checkpoint LATEST names, else the run's config.yaml."""
    from prefopt.checkpoints import CONFIG_FILE, checkpoint_root, latest_name

    latest = latest_name(run_dir)
    if latest:
        in_checkpoint = checkpoint_root(run_dir) / latest / CONFIG_FILE
        if in_checkpoint.is_file():
            return in_checkpoint
    return run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None


def check_resume_config(cfg, run_dir: Path, manifest: dict) -> None:
    """Refuse changes that would mix two runs; record the others."""
    import yaml

    recorded = _recorded_config(run_dir)
    if recorded is None:
        return  # nothing to compare with: a run killed before it wrote its config has no checkpoint either
    try:
        old = yaml.safe_load(recorded.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{recorded} is not valid YAML ({str(e).splitlines()[0]}); it records the run's "
                          "settings, so the resume cannot be checked: restore it") from None
    new = OmegaConf.to_container(cfg, resolve=True)
    changes = config_changes(old, new)
    refused = {k: v for k, v in changes.items() if not _changeable(k)}
    if refused:
        shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(refused.items())[:6])
        raise ConfigError(f"resume=true would change {shown}, which cannot change mid-run; resume with the "
                          f"run's own values (see {recorded}) or start a new run_dir")
    if "max_steps" in changes and cfg.scheduler != "constant":
        a, b = changes["max_steps"]
        raise ConfigError(f"resume=true would change max_steps ({a} -> {b}) under scheduler={cfg.scheduler}, whose "
                          "learning rates were planned for the old length; extend only runs with "
                          "scheduler=constant, or start a new run_dir")
    # What the run did changes; where it lives (a moved folder) and how it reports do not.
    accepted = {k: v for k, v in changes.items()
                if not k.startswith(("hydra.", "wandb.")) and k not in ("resume", "run_dir")}
    if accepted:
        from prefopt.checkpoints import latest_name

        entry = {"from": latest_name(run_dir),
                 "changed": {k: list(v) for k, v in accepted.items()}}
        manifest.setdefault("resumes", []).append(entry)
        write_manifest(run_dir, manifest)


def config_yaml_text(cfg, run_dir: Path) -> str:
    """config.yaml: the config this run is running now, headed by the changes
    earlier resumes made (also in prefopt_run.json)."""
    text = OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))
    manifest = read_manifest(run_dir) or {}
    notes = [f"# resume {i + 1} (from {r.get('from')}): "
             + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in r["changed"].items())
             for i, r in enumerate(manifest.get("resumes", []))]
    return "".join(n + "\n" for n in notes) + text


# ----------------------------------------------------------------------------
# The command that resumes this run.

def this_jobs_overrides() -> list[str]:
    """The command-line overrides of this job (in a sweep: its own values)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside @hydra.main
        return [a for a in sys.argv[1:] if not a.startswith("-")]


def resume_command(run_dir: Path) -> str:
    """A command that resumes this run when pasted into a shell."""
    kept = [o for o in this_jobs_overrides() if o.lstrip("+~").split("=", 1)[0] not in ("run_dir", "resume")]
    return "python train.py " + " ".join(shlex.quote(a) for a in [*kept, run_dir_override(run_dir), "resume=true"])


def run_dir_override(run_dir: Path) -> str:
    """`run_dir=<path>`, quoted for Hydra's override grammar only when the path
    needs it (spaces, commas, brackets, quotes stay part of it)."""
    path = str(run_dir)
    if re.fullmatch(r"[\w./-]+", path):
        return f"run_dir={path}"
    escaped = path.replace("\\", "\\\\").replace('"', '\\"')
    return f'run_dir="{escaped}"'
