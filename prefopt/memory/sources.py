"""The model a run would train, built on the meta device (shapes and dtypes,
no memory, no weights read): from the same source `models.build_model`
loads, so the planner never plans one model while the trainer trains another.

    model.archive=<HF dir or run dir>  its config.json
    model.archive=<adapter checkpoint> the base model.* names (the adapters are
                                       folded into it: same shapes)
    model.init=gguf                    the GGUF file's metadata (no tensors read)
    model.init=config                  model.config, vocab_size from the real tokenizer
With peft=lora/dora, fresh adapters go on top, as in a run.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from utils import ConfigError


def transformers_config(model_cfg):
    """The transformers config of the model `model.*` names, read where
    build_model reads it (see the module docstring)."""
    from prefopt import models

    if model_cfg.get("archive"):
        return _archive_config(model_cfg)
    if model_cfg.init == "config":
        return models.transformers_config(model_cfg, models.build_tokenizer(model_cfg))
    if model_cfg.init == "gguf":
        from transformers import AutoConfig

        folder, name = models.gguf_location(model_cfg)
        return AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    raise ConfigError(f"model.init={model_cfg.init} is unknown; use 'config' or 'gguf', or set model.archive")


def _archive_config(model_cfg):
    from transformers import AutoConfig

    from prefopt import adapters, models

    path = models.resolve_archive(model_cfg.archive)
    if (path / adapters.ADAPTER_CONFIG).is_file():   # merged into the base that model.* builds: its shapes
        return transformers_config(OmegaConf.merge(model_cfg, {"archive": None}))
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True,
                                          trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    except Exception as e:  # transformers raises many types here; each means "not loadable"
        raise models.archive_error(model_cfg.archive, "its config", e) from None


def source_name(model_cfg) -> str:
    """Where the plan's model comes from, for the printed plan."""
    if model_cfg.get("archive"):
        return f"model.archive={model_cfg.archive}"
    if model_cfg.init == "gguf":
        return f"{model_cfg.gguf_package}/{model_cfg.gguf_file}"
    return f"model={model_cfg.name} (config)"


def build_meta_model(cfg, dtype: torch.dtype = torch.float32, config=None) -> torch.nn.Module:
    """The policy of a run of `cfg` on the meta device, in `dtype` (the run's
    precision), with its adapters when peft is on. `config`: an already read
    transformers config (the fit search builds several models of one)."""
    from transformers import AutoModelForCausalLM

    from prefopt import adapters

    config = config if config is not None else transformers_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=bool(cfg.model.get("trust_remote_code", False)))
    if adapters.enabled(cfg):   # adapters on the meta device: their shapes are all the plan needs
        model = adapters.add_adapters(model, cfg.peft, torch.device("cpu"))
    return model
