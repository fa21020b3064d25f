"""The optimizer registry: one place that turns `optimizer=<name>` into an
optimizer object, its Hydra config node, its parameter groups and its LR
schedule.

Names come from these sources, first match wins:
  prefopt            our own: adam_mini (adam_mini.py), and Muon paired with AdamW
                     (torch's Muon only takes 2-D matrices; ours replaces the plain name)
  torch              every `torch.optim.Optimizer` subclass, by getattr(torch.optim, name)
  bitsandbytes       AdamW8bit, PagedAdamW8bit, Adam8bit, ... (8-bit state)
  torchao            AdamW4bit, AdamW8bitAO, AdamWFp8 (optional extra)
  pytorch_optimizer  all of its optimizers by class name (Lion, CAME, Adan, SOAP,
                     Prodigy, ...); a name that clashes with one above gets a
                     `po_` prefix (po_AdamW)
Sources are imported only when a name needs them, so `optimizer=AdamW` never
imports bitsandbytes. An unknown name is a one-line `ConfigError` listing every
valid name; an optimizer that cannot work here (needs a closure, sparse
gradients, a missing package, ...) is refused in one line saying why.

Every keyword of an optimizer's constructor becomes a key of the `optimizer`
config node (generated from its signature), so `optimizer.<keyword>=<value>`
works on the command line for every optimizer, with or without a YAML file.
YAMLs in config/optimizer/ exist only for optimizers with tuned defaults.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import inspect
import io
import logging
import operator
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from prefopt.optim.param_roles import parameter_groups
from prefopt.optim.wrappers import OffloadedOptimizer, build_muon
from utils import ConfigError


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one named optimizer.

    target:  the class or function whose keyword arguments are the config keys
             (None when its package is missing).
    build:   (model, kwargs, decay_embeddings) -> torch.optim.Optimizer;
             kwargs include lr.
    refuse:  if set, why this optimizer cannot train in prefopt (one line).
    fsdp:    how it runs under trainer=fsdp: ELEMENTWISE (on the sharded
             DTensor parameters as they are), BLOCKWISE (on local shards, its
             block statistics summed over ranks: Adam-mini), or why it cannot.
    """

    name: str
    target: Callable | None
    build: Callable[[nn.Module, dict, bool], torch.optim.Optimizer]
    refuse: str | None = None
    fsdp: str = ("it has not been verified on sharded parameters (an optimizer that looks at whole tensors, e.g. "
                 "per-tensor norms or factored/matrix preconditioners, would silently compute something else on 1/N "
                 "slices)")


# OptimizerEntry.fsdp values that train; each is stepped on 2 ranks against
# trainer=basic in tests/test_fsdp.py.
ELEMENTWISE, BLOCKWISE = "elementwise", "blockwise"


def _build_with_groups(cls: type) -> Callable:
    """Most optimizers: the class over our parameter groups."""
    def build(model: nn.Module, kwargs: dict, decay_embeddings: bool) -> torch.optim.Optimizer:
        return cls(parameter_groups(model, kwargs.get("weight_decay"), decay_embeddings), **kwargs)

    return build


def _missing(name: str, package: str, pip_name: str | None = None) -> OptimizerEntry:
    return OptimizerEntry(name, None, None, f"it needs the package '{package}' (pip install {pip_name or package})")


# ---------------------------------------------------------------- torch.optim

TORCH_FSDP = {
    **dict.fromkeys(("ASGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "SGD"),
                    ELEMENTWISE),
    "Adafactor": "it keeps row and column means of each whole weight matrix, and under FSDP a rank holds only a "
                 "slice of it",
    "Rprop": "torch's DTensor has no sharding rule for the in-place index_put_ its step uses",
}
TORCH_REFUSALS = {
    "SparseAdam": "SparseAdam only accepts sparse gradients (nn.Embedding(sparse=True)); transformer weights get "
                  "dense gradients. Use Adam or AdamW",
    "LBFGS": "LBFGS needs a closure that re-evaluates the loss several times per step, which a preference-training "
             "step does not provide. Use AdamW, RMSprop or SGD",
}


@functools.cache
def _torch_entries() -> dict[str, OptimizerEntry]:
    entries = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            entry = OptimizerEntry(name, cls, _build_with_groups(cls), TORCH_REFUSALS.get(name))
            entries[name] = replace(entry, fsdp=TORCH_FSDP[name]) if name in TORCH_FSDP else entry
    return entries


# ---------------------------------------------------------------- our own

def _build_adam_mini(model: nn.Module, kwargs: dict, decay_embeddings: bool) -> torch.optim.Optimizer:
    from prefopt.optim.adam_mini import build_adam_mini

    # decay_embeddings is a run-level key (as lr): the same setting for every optimizer
    return build_adam_mini(model, decay_embeddings=decay_embeddings, **kwargs)








def _build_function(fn: Callable) -> Callable:
    return lambda model, kwargs, decay_embeddings: fn(model, **kwargs)


@functools.cache
def _own_entries() -> dict[str, OptimizerEntry]:
    entries = {"Muon": OptimizerEntry("Muon", build_muon, _build_function(build_muon), fsdp=(
        "it orthogonalizes whole weight matrices (Newton-Schulz iterations), and under FSDP a rank holds only a "
        "slice of each"))}
    try:
        from prefopt.optim.adam_mini import build_adam_mini

        entries["adam_mini"] = OptimizerEntry("adam_mini", build_adam_mini, _build_adam_mini, fsdp=BLOCKWISE)
    except ImportError as e:
        entries["adam_mini"] = _missing("adam_mini", e.name)
    return entries


# ---------------------------------------------------------------- bitsandbytes

BNB_NAMES = ("AdamW8bit", "PagedAdamW8bit", "Adam8bit", "PagedAdam8bit", "Lion8bit", "PagedLion8bit",
             "RMSprop8bit", "SGD8bit", "AdEMAMix8bit")


def _quiet_import(module: str):
    """Import a package that logs or prints at import time (bitsandbytes
    reports optional CPU kernels it cannot load); keep prefopt quiet."""
    import importlib

    logging.getLogger(module).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(module)


def _package_entries(module: str, names: dict[str, str], pip_name: str | None = None) -> dict[str, OptimizerEntry]:
    """Entries for an optional package's optimizer classes: our name -> the
    class's (dotted) path in `module`. Without the package, each name is
    refused with the pip command that installs it."""
    try:
        package = _quiet_import(module)
    except ImportError:
        return {name: _missing(name, module.split(".")[0], pip_name) for name in names}
    entries = {}
    for name, path in names.items():
        with contextlib.suppress(AttributeError):   # a class this version of the package lacks
            cls = operator.attrgetter(path)(package)
            entries[name] = OptimizerEntry(name, cls, _build_with_groups(cls))
    return entries


@functools.cache
def _bitsandbytes_entries() -> dict[str, OptimizerEntry]:
    return _package_entries("bitsandbytes", {name: f"optim.{name}" for name in BNB_NAMES})


# ---------------------------------------------------------------- torchao

TORCHAO_NAMES = {"AdamW4bit": "AdamW4bit", "AdamW8bitAO": "AdamW8bit", "AdamWFp8": "AdamWFp8"}


@functools.cache
def _torchao_entries() -> dict[str, OptimizerEntry]:
    return _package_entries("torchao.optim", TORCHAO_NAMES, "torchao==0.18.0")


# ---------------------------------------------------------------- pytorch_optimizer

# Tried one by one on a tiny Llama (tests/test_optimizer_registry.py): these
# cannot run in a plain backward(); step() loop over a whole model.
PO_REFUSALS = {
    "AliG": "it needs a closure returning the loss at every step",
    "BSAM": "it is a SAM variant that needs a closure and the dataset size (num_data)",
    "LBFGS": "it needs a closure that re-evaluates the loss",
    "AdaHessian": "it needs Hessian-vector products (backward with create_graph=True)",
    "SophiaH": "it needs Hessian-vector products (backward with create_graph=True)",
    "LOMO": "it fuses the update into backward and needs the model object, not parameters",
    "AdaLOMO": "it fuses the update into backward and needs the model object, not parameters",
    "AdamMini": "this variant needs the model object; use optimizer=adam_mini (prefopt's own, faster)",
    "Muon": "it needs parameter groups marked use_muon; use optimizer=Muon (torch's, paired with AdamW)",
    "AdaMuon": "it needs parameter groups marked use_muon; use optimizer=Muon (torch's, paired with AdamW)",
    "AdaGO": "it needs parameter groups marked use_muon; use optimizer=Muon (torch's, paired with AdamW)",
    "NorMuon": "it needs parameter groups marked use_muon; use optimizer=Muon (torch's, paired with AdamW)",
    "MuonClip": "it needs parameter groups marked use_muon and attention logits; use optimizer=Muon",
    "DistributedMuon": "it needs parameter groups marked use_muon and a process group; use optimizer=Muon",
    "SpectralSphere": "it only accepts 2-D parameters; use optimizer=Muon for a Muon-style update",
    "LoRARite": "it optimizes LoRA factor pairs only, not full weight matrices",
    "Magma": "it wraps another optimizer object (pass an optimizer, not parameters)",
    "DeMo": "it needs the packages 'einops' and a process group (decoupled momentum for distributed training)",
}


@functools.cache
def _pytorch_optimizer_entries() -> dict[str, OptimizerEntry]:
    try:
        po = _quiet_import("pytorch_optimizer")
    except ImportError:
        return {}
    taken = set(_torch_entries()) | set(_own_entries()) | set(_bitsandbytes_entries()) | set(_torchao_entries())
    entries = {}
    for key in po.get_supported_optimizers():
        cls = po.load_optimizer(key)
        if not cls.__module__.startswith("pytorch_optimizer"):
            continue   # a re-export of torch's own class (adamw, sgd, ...): already listed
        name = cls.__name__ if cls.__name__ not in taken else f"po_{cls.__name__}"
        entries[name] = OptimizerEntry(name, cls, _build_with_groups(cls), PO_REFUSALS.get(cls.__name__))
    return entries


SOURCES = (_own_entries, _torch_entries, _bitsandbytes_entries, _torchao_entries, _pytorch_optimizer_entries)


def registry() -> dict[str, OptimizerEntry]:
    """Every name, from every source (imports every optional package)."""
    merged: dict[str, OptimizerEntry] = {}
    for source in reversed(SOURCES):   # earlier sources win
        merged.update(source())
    return merged


def find_entry(name: str) -> OptimizerEntry | None:
    """The entry for `name`, importing only the sources up to the one that has it."""
    for source in SOURCES:
        entries = source()
        if name in entries:
            return entries[name]
    return None


def fsdp_supported() -> list[str]:
    """The names that train under trainer=fsdp (only ours and torch's do)."""
    entries = {**_own_entries(), **_torch_entries()}
    return sorted((n for n, e in entries.items() if e.fsdp in (ELEMENTWISE, BLOCKWISE)), key=str.lower)


def get_entry(name: str) -> OptimizerEntry:
    entry = find_entry(name)
    if entry is None:
        raise ConfigError(unknown_name_message("optimizer", name, sorted(registry(), key=str.lower)))
    if entry.refuse:
        raise ConfigError(f"optimizer={name} cannot be used: {entry.refuse}")
    return entry


def unknown_name_message(group: str, name: str, valid: list[str]) -> str:
    lowered = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    hint = f" (did you mean {lowered[close[0]]}?)" if close else ""
    return f"unknown {group} '{name}'{hint}; valid names: {', '.join(valid)}"


# ----------------------------------------------------------------------------
# Config nodes from signatures.

def _config_value(default):
    """A constructor default as a plain config value, or `_SKIP` when it has
    none (a callable, a class...): such keywords keep their default."""
    if isinstance(default, tuple):
        default = [_config_value(d) for d in default]
        return _SKIP if _SKIP in default else default
    if isinstance(default, torch.Tensor):
        return default.item()
    if isinstance(default, torch.dtype):
        return str(default).removeprefix("torch.")          # torch.bfloat16 -> "bfloat16"
    if default is None or isinstance(default, (bool, int, float, str, list)):
        return default
    return _SKIP


_SKIP = object()
_NOT_CONFIG_KEYS = ("self", "params", "model", "named_params", "lr", "decay_embeddings")


def annotation_kind(annotation):
    """What a signature annotation says a keyword's config value may be
    (a config_checks.Kind), or None when it says nothing a config value could
    follow (no annotation, a Callable, a module...). `float` and
    `float | Tensor` are a number (0 as good as 0.9), `int` an integer, `str`,
    a Literal of strings and `torch.dtype` a string, `tuple[float, float]` a
    list of 2 numbers, `tuple[int, ...]` a list of integers, `X | None` X or null;
    members a config cannot hold (Tensor, Callable...) are left out of a Union."""
    import types
    import typing

    from prefopt.config_checks import Kind, NoneType

    if annotation in (bool, int, float, str, NoneType):
        return Kind(frozenset({annotation}))
    if annotation is torch.dtype:
        return Kind(frozenset({str}))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        literal_types = {type(a) for a in args}
        return Kind(frozenset(literal_types)) if literal_types <= {bool, int, float, str, NoneType} else None
    if origin in (typing.Union, types.UnionType):
        kinds = [k for k in map(annotation_kind, args) if k is not None]
        if not kinds or all(k.scalars <= {NoneType} and k.lengths is None for k in kinds):
            return None
        try:
            return functools.reduce(operator.or_, kinds)
        except TypeError:   # lists of fixed and of any length in one Union: leave it to the default
            return None
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return Kind(lengths=frozenset(), items=(annotation_kind(args[0]),))
        return Kind(lengths=frozenset({len(args)}), items=tuple(map(annotation_kind, args)))
    if origin is list and args:
        return Kind(lengths=frozenset(), items=(annotation_kind(args[0]),))
    return None


@functools.cache
def _config_keywords(target: Callable) -> tuple:
    """(keyword, config value of its default, Kind from its annotation or None)
    for every keyword that is a config key. `params`, `lr` and
    `decay_embeddings` are left out: parameters come from the model, lr and
    decay_embeddings are top-level run keys so that `lr=...` on the command
    line always wins and every optimizer treats embeddings alike."""
    try:
        signature = inspect.signature(target, eval_str=True)
    except Exception:   # an annotation that does not evaluate here: go by the defaults
        signature = inspect.signature(target)
    keywords = []
    for key, p in signature.parameters.items():
        if key in _NOT_CONFIG_KEYS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = _config_value(None if p.default is inspect.Parameter.empty else p.default)
        if value is _SKIP:
            continue
        kind = None if isinstance(p.annotation, str) else annotation_kind(p.annotation)
        if kind is not None and value is not None:
            if kind.accepts(kind.coerce(value)):
                value = kind.coerce(value)
            else:
                kind = None   # an annotation its own default contradicts: trust the default
        keywords.append((key, value, kind))
    return tuple(keywords)


def signature_defaults(target: Callable) -> dict:
    """Constructor keywords and their defaults, as plain config values: a
    default of 0 for a keyword annotated `float` becomes 0.0, so the config
    says it is a number (see _config_keywords for the keywords left out)."""
    return copy.deepcopy({key: value for key, value, _ in _config_keywords(target)})   # callers may edit it


@functools.cache
def keyword_kinds(target: Callable) -> dict:
    """keyword -> the config_checks.Kind its config value must have (None:
    anything): from its annotation, else from its default, where an int
    default only says "a number" (without an annotation, `momentum=0` does not
    make momentum an integer)."""
    from prefopt.config_checks import Kind

    return {key: kind or Kind.of(value, int_is_number=True) for key, value, kind in _config_keywords(target)}


def config_kinds(name: str | None) -> dict:
    """keyword_kinds of the optimizer `name`; {} for a name without a target
    (unknown, or its package missing: refused elsewhere)."""
    entry = find_entry(name) if name else None
    return keyword_kinds(entry.target) if entry is not None and entry.target is not None else {}


def register_configs(names=None) -> None:
    """Put one config node per optimizer name in Hydra's ConfigStore:
    `optimizer_base/<name>` holds every keyword with its default, and
    `optimizer/<name>` selects it, unless config/optimizer/<name>.yaml exists
    (those YAMLs extend `optimizer_base/<name>` with tuned values).
    `names`: only these (plus the YAML ones), so that a run imports only the
    packages it uses; None: every name."""
    from pathlib import Path

    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    yaml_dir = Path(__file__).resolve().parents[2] / "config" / "optimizer"
    if names is None:
        entries = registry()
    else:
        wanted = set(names) | {p.stem for p in yaml_dir.glob("*.yaml")}
        entries = {n: e for n in sorted(wanted) if (e := find_entry(n)) is not None}
    for name, entry in entries.items():
        node = {"name": name, **(signature_defaults(entry.target) if entry.target else {})}
        store.store(group="optimizer_base", name=name, node=node)
        if not (yaml_dir / f"{name}.yaml").exists():
            store.store(group="optimizer", name=name, node={"optimizer": node}, package="_global_")


# Required constructor arguments (no default) that the run itself can supply.
RUN_ARGUMENTS = {"num_iterations": "max_steps", "total_steps": "max_steps", "num_training_steps": "max_steps"}


def optimizer_kwargs(name: str, opt_cfg: dict, lr: float, device: torch.device, run_values: dict | None = None) -> dict:
    """The keyword arguments for the constructor: config values with lists
    turned back into tuples where the signature uses tuples, required
    arguments the run knows (e.g. num_iterations = max_steps), and the fastest
    implementation torch has on this device unless the user chose one."""
    target = get_entry(name).target
    params = inspect.signature(target).parameters
    kwargs = {"lr": lr}
    for key, value in opt_cfg.items():
        if key == "name":
            continue
        if key not in params:
            valid = [k for k in signature_defaults(target)]
            raise ConfigError(f"optimizer.{key} is not a keyword of {name}; valid keywords: {', '.join(valid)}")
        if isinstance(value, list) and isinstance(params[key].default, tuple):
            value = tuple(value)
        if isinstance(params[key].default, torch.dtype) and isinstance(value, str):
            value = getattr(torch, value)
        if value is None and params[key].default is inspect.Parameter.empty and key in RUN_ARGUMENTS:
            value = (run_values or {}).get(RUN_ARGUMENTS[key])
        kwargs[key] = value
    if "fused" in kwargs and kwargs["fused"] is None and not kwargs.get("differentiable"):
        # Fused kernels exist for Adam, AdamW, SGD and Adagrad on CPU and CUDA;
        # they are the fastest path and numerically equal to the loop version.
        kwargs["fused"] = device.type in ("cpu", "cuda") and not kwargs.get("capturable", False)
    return kwargs


def build_optimizer(model: nn.Module, name: str, opt_cfg: dict, lr: float, device: torch.device,
                    decay_embeddings: bool = False, run_values: dict | None = None,
                    offload_to: str | None = None) -> torch.optim.Optimizer:
    """The configured optimizer over `model`; with `offload_to` (e.g. "cpu")
    its state and master weights live on that device (OffloadedOptimizer)."""
    entry = get_entry(name)
    if offload_to:   # the optimizer runs where its state lives: fused kernels for that device
        device = torch.device(offload_to)
    kwargs = optimizer_kwargs(name, opt_cfg, lr, device, run_values)
    try:
        optimizer = entry.build(model, kwargs, decay_embeddings)
        return OffloadedOptimizer(optimizer, offload_to) if offload_to else optimizer
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"optimizer={name} rejected its settings: {str(e).splitlines()[0]}") from None
