"""Config validation, before any heavy work (no model, no data loaded yet).

Everything here turns a mistake into one `ConfigError` line that says what
was wrong and what to do. `check_command_line` runs in train.py before Hydra
starts (Hydra's own reports are several lines and sometimes a traceback). It
reads the command line with Hydra's own parsers (its argparse flags, its
override grammar), expands a `-m` sweep into its jobs as Hydra's basic sweeper
does, and composes and checks every job before the first one starts.
`validate` runs on the composed config, also inside every multirun job.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from prefopt import losses
from utils import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
CONFIG_NAME = "config"
GROUPS = ("model", "loss", "optimizer", "dataset", "trainer")


# ----------------------------------------------------------------------------
# The command line, before Hydra.

class _LeftToHydra(Exception):
    """Hydra's argument parser would exit here (--version prints and exits):
    nothing to check, Hydra does it."""


def hydra_args(argv: list[str]) -> argparse.Namespace:
    """`argv` read by the very parser @hydra.main uses (hydra/_internal/utils.py
    get_args_parser): Hydra's flags with their values (--cfg job, --info,
    --config-name ...) and, in `.overrides`, the key=value overrides. A flag
    Hydra would refuse is a one-line ConfigError."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        raise ConfigError(f"{message} (`python train.py --hydra-help` lists Hydra's flags)")

    def leave(status: int = 0, message: str | None = None):
        raise _LeftToHydra

    parser.error, parser.exit = error, leave
    with contextlib.redirect_stdout(io.StringIO()):   # what --version prints: Hydra prints it itself
        args = parser.parse_args(argv)
    # Hydra's own refusals of flag combinations (in _run_hydra) are tracebacks: one line here.
    if args.resolve and args.cfg is None and not args.help:
        raise ConfigError("--resolve works only together with --cfg or --help")
    if args.run + (args.cfg is not None) + args.multirun + args.shell_completion + (args.info is not None) > 1:
        raise ConfigError("only one of --run, --multirun, --cfg, --info and --shell-completion can be given")
    return args


def parse_overrides(overrides: list[str], config_loader=None) -> list:
    """Hydra's override grammar (the parser Hydra itself uses): `Override`
    objects; a `config_loader` is needed only to expand glob() sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=config_loader).parse_overrides(list(overrides))


@dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from: train.py's config/config.yaml unless
    --config-path/-cp, --config-name/-cn or --config-dir/-cd say otherwise."""

    config_dir: str = str(CONFIG_DIR)
    config_name: str = CONFIG_NAME
    extra_dir: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConfigSource:
        # as Hydra does, a relative --config-path is relative to train.py's folder
        config_dir = CONFIG_DIR if args.config_path is None else CONFIG_DIR.parent / args.config_path
        extra = None
        if args.config_dir is not None:
            extra = os.path.abspath(args.config_dir)
            if not os.path.isdir(extra):
                raise ConfigError(f"--config-dir {args.config_dir}: no such folder ({extra})")
        return cls(str(config_dir), args.config_name or CONFIG_NAME, extra)

    def dirs(self) -> list[Path]:
        return [Path(self.config_dir)] + ([Path(self.extra_dir)] if self.extra_dir else [])

    def search_path_override(self) -> list[str]:
        return [f"hydra.searchpath=[file://{self.extra_dir}]"] if self.extra_dir else []


DEFAULT_SOURCE = ConfigSource()


def group_options(group: str, source: ConfigSource = DEFAULT_SOURCE) -> list[str]:
    from prefopt import optim as optimizers

    names = {p.stem for d in source.dirs() for p in (d / group).glob("*.yaml")}
    if group == "optimizer":
        names |= set(optimizers.registry())
    if group == "loss":
        names |= set(losses.all_names())
    return sorted(names, key=str.lower)


def _choices(parsed: list, group: str) -> list[str]:
    """The options that parsed overrides name for `group` (every value of a
    sweep; a glob() is expanded later, by Hydra, against the real options)."""
    from hydra.core.override_parser.types import ValueType

    names = []
    for o in parsed:
        if o.key_or_group != group or o.is_delete():
            continue
        if o.is_sweep_override():
            if o.is_discrete_sweep() and o.value_type != ValueType.GLOB_CHOICE_SWEEP:
                names += [str(getattr(v, "text", v)) for v in o.sweep_iterator()]
        elif o.value() is not None:
            names.append(str(o.value()))
    return names


def chosen(argv: list[str], group: str) -> list[str]:
    """The options named for `group` on the command line (several in a sweep).
    [] when the command line does not parse: check_command_line says why."""
    try:
        return _choices(parse_overrides(hydra_args(argv).overrides), group)
    except Exception:   # ConfigError, _LeftToHydra, Hydra's OverrideParseException
        return []


def check_group_choices(parsed: list, source: ConfigSource = DEFAULT_SOURCE) -> None:
    """A misspelled `group=name` (also inside a sweep list `a,b,c`), in the
    parsed overrides."""
    from prefopt import optim as optimizers

    for group in GROUPS:
        for choice in _choices(parsed, group):
            if any((d / group / f"{choice}.yaml").is_file() for d in source.dirs()):
                continue
            if group == "loss" and choice in losses.all_names():
                continue   # config nodes generated from the loss registry
            if group == "optimizer" and optimizers.find_entry(choice) is not None:
                continue   # found without importing every optional optimizer package
            raise ConfigError(optimizers.unknown_name_message(group, choice, group_options(group, source)))


def compose(overrides: list[str], source: ConfigSource = DEFAULT_SOURCE,
            return_hydra_config: bool = False) -> DictConfig:
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=source.config_dir, version_base="1.3"):
        return _compose(overrides, source, return_hydra_config)


def _compose(overrides: list[str], source: ConfigSource, return_hydra_config: bool = False) -> DictConfig:
    """compose() inside an initialized Hydra."""
    from hydra import compose as hydra_compose

    losses.register_configs()   # loss nodes are generated (idempotent); the caller registers optimizer nodes
    return hydra_compose(source.config_name, overrides=[*source.search_path_override(), *overrides],
                         return_hydra_config=return_hydra_config)


def _one_line_hydra_error(e: Exception) -> str:
    text = str(e).strip()
    missing = re.search(r"Could not override '([^']+)'", text)
    if missing:
        key = missing.group(1)
        return (f"unknown config key '{key}'; check its spelling against config/config.yaml "
                f"(or `python train.py --cfg job`), or add a new key with +{key}=...")
    ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", text)
    if ambiguous:
        return (f"{ambiguous.group(1)} has several values: add -m to run one job per value, "
                "or write a list as [a,b] or a string in quotes")
    first = text.splitlines()[0] if text else type(e).__name__
    if type(e).__name__ == "MissingConfigException":   # e.g. --config-name of no config file
        return f"could not compose the config ({first})"
    return f"could not read the command line ({first}); overrides look like key=value, e.g. lr=1e-4"


def sweep_jobs(overrides: list[str], config_loader=None) -> list[list[str]]:
    """The jobs of `-m`, each as its list of overrides, exactly as Hydra's
    basic sweeper makes them: the cartesian product of every swept key
    (`a=1,2`, `range()`, `choice()`, `glob()`: glob needs the
    `config_loader`); hydra.* overrides are not swept and go to every job,
    first (as Hydra composes them)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.types import RunMode

    parsed = parse_overrides(overrides, config_loader)
    ConfigLoaderImpl.validate_sweep_overrides_legal(parsed, run_mode=RunMode.MULTIRUN, from_shell=True)
    hydra_part = [o.input_line for o in parsed if o.is_hydra_override()]
    (jobs,) = BasicSweeper.split_arguments([o for o in parsed if not o.is_hydra_override()], max_batch_size=None)
    return [hydra_part + job for job in jobs]


class _Composer:
    """Composes the jobs of one command line with one Hydra composition per
    distinct set of config-group choices (plus hydra.* overrides): the job's
    other overrides are applied to a copy of it by Hydra's own
    ConfigLoaderImpl._apply_overrides_to_config, the step that ends every
    Hydra composition. That composition, without them, is also the job's
    defaults for the type checks. A sweep of 21 optimizers is 21
    compositions; a sweep of lr values is one."""

    def __init__(self, source: ConfigSource, config_loader):
        self.source, self.loader, self.bases = source, config_loader, {}

    def _sets_base(self, o) -> bool:
        """A hydra.* override or a config-group choice (Hydra's own test: the
        key is a group of the config search path and the value no dict)."""
        key = o.key_or_group
        return o.is_hydra_override() or (not isinstance(o.value(), dict) and (
            self.loader.repository.group_exists(key) or any((d / key).is_dir() for d in self.source.dirs())))

    def _base(self, overrides: tuple[str, ...]) -> DictConfig:
        if overrides not in self.bases:
            self.bases[overrides] = _compose(list(overrides), self.source, return_hydra_config=True)
        return self.bases[overrides]

    def job(self, overrides: list[str], job_num: int | None) -> tuple[DictConfig, DictConfig]:
        """(the job's config, its defaults: with a hydra node, which the type
        checks skip); a sweep job's run_dir is its sweep subdir, as train.py
        sets it from Hydra's output dir."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.types import RunMode

        parsed = parse_overrides(overrides)
        ConfigLoaderImpl.validate_sweep_overrides_legal(parsed, run_mode=RunMode.RUN, from_shell=True)
        defaults = self._base(tuple(o.input_line for o in parsed if self._sets_base(o)))
        cfg = copy.deepcopy(defaults)
        rest = [o for o in parsed if not self._sets_base(o)]
        if job_num is not None:
            rest += parse_overrides([f"hydra.job.num={job_num}"])
        ConfigLoaderImpl._apply_overrides_to_config(rest, cfg)
        run_dir = (f"{OmegaConf.select(cfg, 'hydra.sweep.dir')}/{OmegaConf.select(cfg, 'hydra.sweep.subdir')}"
                   if job_num is not None else None)
        with open_dict(cfg):
            del cfg["hydra"]
            if run_dir is not None:
                cfg.run_dir = run_dir
        return cfg, defaults


def check_command_line(argv: list[str]) -> None:
    """Everything about the command line that can be known before Hydra runs
    anything: Hydra's flags, the override grammar, group choices, keys, types
    and values (validate), for the run or for every job of a `-m` sweep. With
    --cfg, --info, --help or --hydra-help nothing runs: keys and types only."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        args = hydra_args(argv)
    except _LeftToHydra:
        return
    if args.shell_completion or args.experimental_rerun:
        return  # their arguments are a line to complete / a saved job, not overrides of this config
    if args.config_path and "://" in args.config_path:
        return  # a pkg:// config path: Hydra reads it
    source = ConfigSource.from_args(args)
    try:
        parsed = parse_overrides(args.overrides)
    except Exception as e:  # Hydra's override grammar
        raise ConfigError(_one_line_hydra_error(e)) from None
    check_group_choices(parsed, source)
    run = not (args.cfg or args.info or args.help or args.hydra_help)
    with initialize_config_dir(config_dir=source.config_dir, version_base="1.3"):
        composer = _Composer(source, GlobalHydra.instance().config_loader())
        try:
            jobs = sweep_jobs(args.overrides, composer.loader) if args.multirun else [args.overrides]
        except Exception as e:  # a sweep the basic sweeper cannot expand
            raise ConfigError(_one_line_hydra_error(e)) from None
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        for num, job in enumerate(jobs):
            try:
                try:
                    cfg, defaults = composer.job(job, num if args.multirun else None)
                except Exception as e:  # Hydra's composition and override-grammar errors
                    raise ConfigError(_one_line_hydra_error(e)) from None
                if run:
                    validate(cfg, defaults=defaults)
                else:
                    _check_types(cfg, defaults)
            except ConfigError as e:
                if not args.multirun:
                    raise
                # the job's swept values name it (all its overrides would repeat the whole command line)
                shown = (" ".join(o for o in job if o.partition("=")[0] in swept)
                         or " ".join(o for o in job if not o.startswith("hydra")) or "no overrides")
                raise ConfigError(f"multirun job #{num} of {len(jobs)} ({shown}): {e}") from None


# ----------------------------------------------------------------------------
# What a config value may be.

NoneType = type(None)
_WORDS = {bool: ("true/false", "true/false values"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"), NoneType: ("null", "nulls")}


class _Unmergeable(TypeError):
    pass


@dataclass(frozen=True)
class Kind:
    """What a config value may be, to refuse a wrong one in one line.

    scalars: the plain types it may be: bool, int, float (any number: an int
             is a number too), str, NoneType.
    lengths: None: it may not be a list. Otherwise it may be a list of one of
             these lengths, item i of kind items[i]; an empty set: a list of
             any length, every item of kind items[0] (no items: anything).
             An item kind of None accepts anything.
    """

    scalars: frozenset = frozenset()
    lengths: frozenset | None = None
    items: tuple = ()

    @classmethod
    def of(cls, default, int_is_number: bool = False) -> Kind | None:
        """The kind of a default value; None (check nothing) for null.
        `int_is_number`: an int default only says "a number" (a keyword
        default of 0 where 0.9 is as good)."""
        if isinstance(default, (list, tuple)):
            items = tuple(cls.of(d, int_is_number) for d in default)
            return cls(lengths=frozenset({len(default)}) if default else frozenset(), items=items)
        kind = float if type(default) is int and int_is_number else type(default)
        return cls(frozenset({kind})) if kind in (bool, int, float, str) else None

    def _item(self, i: int) -> Kind | None:
        if self.lengths:
            return self.items[i] if i < len(self.items) else None
        return self.items[0] if self.items else None

    def accepts(self, value) -> bool:
        if isinstance(value, (list, tuple)):
            if self.lengths is None or (self.lengths and len(value) not in self.lengths):
                return False
            return all(k is None or k.accepts(v) for k, v in ((self._item(i), v) for i, v in enumerate(value)))
        if isinstance(value, bool):
            return bool in self.scalars
        if isinstance(value, int):
            return bool({int, float} & self.scalars)
        return type(value) in self.scalars

    def coerce(self, value):
        """`value` with ints made floats where this kind wants a number and
        not an integer (a signature's `momentum: float = 0` gives 0.0)."""
        if isinstance(value, (list, tuple)) and self.lengths is not None:
            return [k.coerce(v) if (k := self._item(i)) else v for i, v in enumerate(value)]
        if type(value) is int and float in self.scalars and int not in self.scalars:
            return float(value)
        return value

    def __or__(self, other: Kind) -> Kind:
        """Either kind (a Union annotation); _Unmergeable where a list of fixed
        length meets a list of any length."""
        lengths, items = self.lengths, self.items
        if other.lengths is not None:
            if lengths is None:
                lengths, items = other.lengths, other.items
            elif bool(lengths) != bool(other.lengths):
                raise _Unmergeable("a list of fixed length or of any length")
            elif lengths:
                lengths = lengths | other.lengths
                items = tuple(b if a is ... else a if b is ... else None if a is None or b is None else a | b
                              for a, b in zip_longest(items, other.items, fillvalue=...))
            else:
                items = (self.items[0] | other.items[0],) if self.items and other.items and None not in (
                    self.items[0], other.items[0]) else ()
        return Kind(self.scalars | other.scalars, lengths, items)

    def describe(self, plural: bool = False) -> str:
        scalars = self.scalars - {int} if float in self.scalars else self.scalars
        words = [_WORDS[t][plural] for t in (bool, int, float, str) if t in scalars]
        if self.lengths is not None:
            head = "lists" if plural else "a list"
            if not self.lengths:
                words.append(f"{head} of {self.items[0].describe(plural=True)}" if self._item(0) else head)
            else:
                counts = " or ".join(map(str, sorted(self.lengths)))
                names = [k.describe() if k else "anything" for k in self.items]
                if len(set(names)) == 1 and self.items[0] is not None:
                    words.append(f"{head} of {counts} {self.items[0].describe(plural=counts != '1')}")
                else:
                    words.append(f"{head} of {counts} items ({', '.join(names)})")
        if NoneType in scalars:
            words.append(_WORDS[NoneType][plural])
        return " or ".join(words)


# ----------------------------------------------------------------------------
# The composed config.

def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """Every key must exist in the defaults for the same group choices, and
    keep the kind of its default (ints stay ints, booleans booleans, a list
    keeps its length and item types...). An optimizer keyword goes by its
    constructor's signature (optimizers.config_kinds): `momentum: float = 0`
    takes 0.9."""
    from prefopt import optim as optimizers

    ignore = ("run_dir", "wandb.name", "wandb.group", "wandb.tags", "model.archive")
    any_length = ("plan.optimizers", "plan.lora_ranks")   # lists whose default is one example of any length
    default_leaves = dict(_leaves(OmegaConf.to_container(defaults, resolve=False)))
    keywords = optimizers.config_kinds(OmegaConf.select(cfg, "optimizer.name"))
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if key.startswith("hydra") or key in ignore:
            continue
        if key not in default_leaves:
            if not any(d.startswith(key + ".") or key.startswith(d + ".") for d in default_leaves):
                raise ConfigError(f"unknown config key '{key}'; check its spelling against config/config.yaml")
            continue
        default = default_leaves[key]
        if value is None or (isinstance(value, str) and "${" in value):
            continue
        group, _, keyword = key.partition(".")
        kind = keywords[keyword] if group == "optimizer" and keyword in keywords else Kind.of(default)
        if default == "auto":   # auto | true | false switches (dataset.chat_template, data.add_bos, data.unpaired)
            kind = Kind(frozenset({str, bool}))
        if key in any_length and kind is not None:
            kind = Kind(lengths=frozenset(), items=kind.items[:1])
        if kind is not None and not kind.accepts(value):
            raise ConfigError(f"{key}={value!r} should be {kind.describe()} (default: {default})")


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


def micro_batch_size(cfg, world: int) -> int:
    """Pairs per micro-batch per rank: `batch_size` split over gradient
    accumulation steps and ranks, which must divide it."""
    if cfg.batch_size % (cfg.gradient_accumulation_steps * world):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by gradient_accumulation_steps="
                          f"{cfg.gradient_accumulation_steps} x world size {world}")
    return cfg.batch_size // (cfg.gradient_accumulation_steps * world)


def validate(cfg: DictConfig, defaults: DictConfig | None = None) -> None:
    """All the checks that need no model and no data."""
    from prefopt import optim as optimizers
    from prefopt.data.unpaired import unpaired_mode
    from prefopt.models import resolve_archive

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
    _choice(cfg, "divergence.action", ("stop", "warn", "off"))
    _choice(cfg, "data.add_bos", ("auto", "always", "never", True, False))
    unpaired_mode(OmegaConf.select(cfg, "data.unpaired"))   # auto | true | false (prefopt/data/unpaired.py)
    for key in ("divergence.param_norm_factor", "divergence.loss_factor", "divergence.patience"):
        _at_least(cfg, key, 1)
    micro_batch_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.warmup_steps >= cfg.max_steps and cfg.scheduler != "constant":
        raise ConfigError(f"warmup_steps={cfg.warmup_steps} leaves no steps for scheduler={cfg.scheduler} "
                          f"(max_steps={cfg.max_steps})")
    optimizers.get_entry(cfg.optimizer.name)   # unknown or refused optimizer (e.g. a missing package)
    if cfg.model.get("archive"):
        resolve_archive(cfg.model.archive)
    if cfg.get("plan_only"):
        from prefopt.memory.settings import plan_settings

        plan_settings(cfg)   # plan.* (gpu_memory=80GiB, gpus, ...)
    _writable_dir(cfg.run_dir)
    if cfg.resume:
        from prefopt import checkpoints

        if not checkpoints.list_checkpoints(Path(cfg.run_dir)):
            raise ConfigError(f"resume=true but {checkpoints.checkpoint_root(Path(cfg.run_dir))} has no checkpoint; "
                              "drop resume=true to start a new run there")
