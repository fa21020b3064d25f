"""The planner's own keys (`plan.*` in config/config.yaml), read and checked
in one place: config_checks.validate calls `plan_settings` before anything
heavy runs, so a bad value is one line, and the planner reads the same
parsed values."""
from __future__ import annotations

import re
from dataclasses import dataclass

from omegaconf import OmegaConf

from utils import ConfigError

# Decimal and binary units, as GPU makers (80GB) and nvidia-smi / PyTorch (GiB) write them.
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-z]*)")


def parse_bytes(value, key: str) -> int:
    """'80GiB', '80GB', '80 gb', 85899345920 or '8.5e10' -> bytes; anything
    else (or a size that is not positive) is one ConfigError line."""
    wrong = ConfigError(f"{key}={value!r} is not a memory size; write it like 80GiB, 80GB or a number of bytes")
    if isinstance(value, bool):
        raise wrong
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = _SIZE.fullmatch(str(value).strip().lower())
        if not match or match.group(3) not in UNITS:
            raise wrong
        mantissa, exponent, unit = match.groups()
        number = float(mantissa) * 10 ** int(exponent or 0) * UNITS[unit]
    if number < 1:
        raise wrong
    return int(number)


def _positive_int(value, key: str, hint: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer ({hint})")
    return value


def optimizer_name(name: str) -> str:
    """A name of plan.optimizers as the registry spells it: exact, or written
    as in the papers ('Adam-mini' -> adam_mini); unknown names are the
    registry's one-line error (with its did-you-mean). A known name whose
    package is missing passes: the fit search says it cannot be planned."""
    from prefopt import optim as optimizers

    if optimizers.find_entry(name) is not None:
        return name
    spelled = str(name).replace("-", "_").lower()
    if optimizers.find_entry(spelled) is not None:
        return spelled
    try:
        optimizers.get_entry(name)   # raises: unknown name, with the valid ones
    except ConfigError as e:
        raise ConfigError(f"plan.optimizers: {e}") from None
    return name


@dataclass(frozen=True)
class PlanSettings:
    """plan.* parsed: gpus None = as the trainer would start (trainer.nproc);
    gpu_memory None = no fit search."""

    gpus: int | None
    gpu_memory: int | None
    optimizers: tuple[str, ...]
    lora_ranks: tuple[int, ...]
    reserve: float
    show: int


def plan_settings(cfg) -> PlanSettings:
    """The plan.* keys of `cfg`, checked (each mistake one ConfigError line)."""
    node = OmegaConf.select(cfg, "plan", default=None) or {}
    get = node.get
    gpus = get("gpus")
    gpus = None if gpus is None else _positive_int(gpus, "plan.gpus", "the number of GPUs to plan for")
    memory = get("gpu_memory")
    memory = None if memory is None else parse_bytes(memory, "plan.gpu_memory")
    names = get("optimizers") or []
    if isinstance(names, str):
        names = [names]
    if memory is not None and not names:
        raise ConfigError("plan.optimizers is empty; list the optimizers the fit search may choose from, "
                          "e.g. plan.optimizers=[AdamW,adam_mini]")
    ranks = tuple(_positive_int(r, "plan.lora_ranks", "LoRA ranks to try with peft on")
                  for r in get("lora_ranks") or [])
    reserve = get("reserve", 0.1)
    if isinstance(reserve, bool) or not isinstance(reserve, (int, float)) or not 0 <= reserve < 1:
        raise ConfigError(f"plan.reserve={reserve!r} must be a fraction in [0, 1) (the share of each GPU kept free)")
    show = _positive_int(get("show", 10), "plan.show", "how many fitting settings to list")
    # names are looked up only for a fit search: the lookup imports the optional packages (bitsandbytes ...)
    names = tuple(dict.fromkeys(optimizer_name(n) for n in names)) if memory is not None else tuple(names)
    return PlanSettings(gpus, memory, names, ranks, float(reserve), show)
