"""Config validation, before any heavy work (no model, no data loaded yet).

Everything here turns a mistake into one `ConfigError` line that says what
was wrong and what to do. `check_command_line` runs in train.py before Hydra
starts (Hydra's own reports are several lines and sometimes a traceback);
`validate` runs on the composed config, also inside every multirun job.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from utils import ConfigError

CONFIG_DIR = Path(__file__).parent / "config"
GROUPS = ("model", "loss", "optimizer", "dataset", "trainer")
MULTIRUN_FLAGS = ("-m", "--multirun")


# ----------------------------------------------------------------------------
# The command line, before Hydra.

def group_options(group: str) -> list[str]:
    import optimizers

    names = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
    if group == "optimizer":
        names |= set(optimizers.registry())
    return sorted(names, key=str.lower)


def _overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def _group_choices(argv: list[str]) -> list[str]:
    return [a for a in _overrides(argv) if a.partition("=")[0].lstrip("+~") in GROUPS]


def chosen(argv: list[str], group: str) -> list[str]:
    """The options named for `group` on the command line (several in a sweep)."""
    return [choice for arg in _group_choices(argv) if arg.lstrip("+~").partition("=")[0] == group
            for choice in arg.partition("=")[2].split(",")]


def check_group_choices(argv: list[str]) -> None:
    """A misspelled `group=name` (also inside a sweep list `a,b,c`)."""
    import optimizers

    for group in GROUPS:
        for choice in chosen(argv, group):
            if (CONFIG_DIR / group / f"{choice}.yaml").is_file():
                continue
            if group == "optimizer" and optimizers.find_entry(choice) is not None:
                continue   # found without importing every optional optimizer package
            raise ConfigError(optimizers.unknown_name_message(group, choice, group_options(group)))


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def _one_line_hydra_error(e: Exception, overrides: list[str]) -> str:
    text = str(e)
    missing = re.search(r"Could not override '([^']+)'", text)
    if missing:
        key = missing.group(1)
        return (f"unknown config key '{key}'; check its spelling against config/config.yaml "
                f"(or `python train.py --cfg job`), or add a new key with +{key}=...")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"could not read the command line ({first}); overrides look like key=value, e.g. lr=1e-4"


def check_command_line(argv: list[str]) -> None:
    check_group_choices(argv)
    if any(a in MULTIRUN_FLAGS for a in argv):
        return  # sweep values are checked per job, by validate() inside main
    overrides = _overrides(argv)
    try:
        cfg = compose(overrides)
    except Exception as e:  # Hydra's composition and override-grammar errors
        raise ConfigError(_one_line_hydra_error(e, overrides)) from None
    validate(cfg, defaults=compose(_group_choices(argv)))


# ----------------------------------------------------------------------------
# The composed config.

def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _type_name(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def _check_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """Every key must exist in the defaults for the same group choices, and
    keep the type of its default (ints stay ints, booleans booleans...)."""
    ignore = ("run_dir", "wandb.name", "wandb.group", "wandb.tags", "model.archive")
    default_leaves = dict(_leaves(OmegaConf.to_container(defaults, resolve=False)))
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if key.startswith("hydra") or key in ignore:
            continue
        if key not in default_leaves:
            if not any(d.startswith(key + ".") or key.startswith(d + ".") for d in default_leaves):
                raise ConfigError(f"unknown config key '{key}'; check its spelling against config/config.yaml")
            continue
        default = default_leaves[key]
        if default is None or value is None or isinstance(default, list):
            continue
        if isinstance(value, str) and "${" in value:
            continue
        ok = (isinstance(value, bool) if isinstance(default, bool)
              else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
              else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
              else isinstance(value, str) if isinstance(default, str) else True)
        if not ok:
            raise ConfigError(f"{key}={value!r} should be {_type_name(default)} (default: {default})")


def _at_least(cfg, key: str, low) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def _choice(cfg, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value} is not one of {', '.join(map(str, choices))}")


def _writable_dir(path: str) -> None:
    """Try it: permission bits say nothing for root or read-only mounts."""
    import tempfile

    p = Path(path).expanduser().absolute()
    while not p.exists():
        p = p.parent
    try:
        Path(tempfile.mkdtemp(dir=p, prefix=".prefopt-probe-")).rmdir()
    except OSError as e:
        raise ConfigError(f"run_dir={path} cannot be written ({e.strerror}); choose another run_dir") from None


def validate(cfg: DictConfig, defaults: DictConfig | None = None) -> None:
    """All the checks that need no model and no data."""
    import optimizers
    from models import resolve_archive

    if defaults is not None:
        _check_types(cfg, defaults)
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_every",
                "eval_every", "n_eval_examples", "max_length", "max_prompt_length"):
        _at_least(cfg, key, 1)
    for key in ("save_every", "keep_last", "warmup_steps", "n_eval_generations", "lr"):
        _at_least(cfg, key, 0)
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length={cfg.max_prompt_length} must be smaller than max_length={cfg.max_length} "
                          "(responses need room)")
    _choice(cfg, "scheduler", optimizers.SCHEDULES)
    _choice(cfg, "wandb.mode", ("offline", "online", "disabled"))
    _choice(cfg, "nonfinite", ("stop", "skip"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (cfg.gradient_accumulation_steps * world):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by gradient_accumulation_steps="
                          f"{cfg.gradient_accumulation_steps} x world size {world}")
    if cfg.warmup_steps >= cfg.max_steps and cfg.scheduler != "constant":
        raise ConfigError(f"warmup_steps={cfg.warmup_steps} leaves no steps for scheduler={cfg.scheduler} "
                          f"(max_steps={cfg.max_steps})")
    optimizers.get_entry(cfg.optimizer.name)   # unknown or refused optimizer (e.g. a missing package)
    if cfg.model.get("archive"):
        resolve_archive(cfg.model.archive)
    _writable_dir(cfg.run_dir)
    if cfg.resume:
        import checkpoints

        if not checkpoints.list_checkpoints(Path(cfg.run_dir)):
            raise ConfigError(f"resume=true but {checkpoints.checkpoint_root(Path(cfg.run_dir))} has no checkpoint; "
                              "drop resume=true to start a new run there")
