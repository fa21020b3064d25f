"""PEFT adapters (`peft=lora`, `peft=dora`): train low-rank adapters on a
frozen base model, through Hugging Face PEFT (no hand-written adapters).

What changes for a run:
  - only the adapters have requires_grad, so gradients and optimizer state
    cover them alone (`memory/params_trainable_bytes` says how many bytes);
  - the reference model is the base model with the adapters disabled: no
    second copy of the weights (`memory/reference_params_bytes` = 0);
  - checkpoints hold the adapters in PEFT's own format
    (`adapter_model.safetensors` + `adapter_config.json`), and with
    `export.merged=true` the last one also holds `merged/`, the base with the
    adapters folded in, which `transformers` loads alone;
  - `model.archive=<an adapter checkpoint>` starts from that checkpoint's
    model: its adapters on the base model.* builds (checked by digest),
    folded in (`merged_archive`).
QLoRA (`peft.quantize=4bit`) needs bitsandbytes' 4-bit kernels on a CUDA GPU;
elsewhere it is refused with one line.
"""
from __future__ import annotations

from pathlib import Path

import torch

from utils import ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def enabled(cfg) -> bool:
    """Does this run train adapters (peft=lora or peft=dora)?"""
    peft_cfg = cfg.get("peft")
    return bool(peft_cfg) and peft_cfg.get("name", "none") != "none"


def add_adapters(model: torch.nn.Module, peft_cfg, device: torch.device | None = None) -> torch.nn.Module:
    """`model` wrapped as a PEFT model with fresh LoRA (or DoRA) adapters on
    `peft.target_modules`; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    check_quantization(peft_cfg, device)
    targets = peft_cfg.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=int(peft_cfg.r), lora_alpha=float(peft_cfg.alpha), lora_dropout=float(peft_cfg.dropout),
                        target_modules=targets, use_dora=bool(peft_cfg.use_dora), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:   # e.g. target modules that the model does not have
        raise ConfigError(f"peft={peft_cfg.name}: {str(e).splitlines()[0]}; check peft.target_modules") from None


def check_quantization(peft_cfg, device: torch.device | None) -> None:
    mode = peft_cfg.get("quantize", "none")
    if mode in (None, "none"):
        return
    if mode != "4bit":
        raise ConfigError(f"peft.quantize={mode} is not one of none, 4bit")
    if device is None or device.type != "cuda":
        raise ConfigError("peft.quantize=4bit (QLoRA) needs bitsandbytes' 4-bit kernels on a CUDA GPU, and this run "
                          f"is on {device.type if device is not None else 'the CPU'}; use peft.quantize=none here")
    raise ConfigError("peft.quantize=4bit is not implemented yet (it has never run: no GPU was available to test it); "
                      "use peft.quantize=none")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (adapters injected in its
    layers), or `model` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def disabled(model: torch.nn.Module):
    """Context: the model's forward without its adapters (the reference)."""
    return model.disable_adapter()


def load_adapter_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The adapters of checkpoint `ckpt` into `model` (a PEFT model)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(ckpt / ADAPTER_WEIGHTS))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigError(f"checkpoint {ckpt} holds adapters that the configured model does not have "
                          f"({unexpected[:3]}); resume with the run's own peft.* settings")


def base_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The base model's weights, by name, adapters excluded (the whole model
    when it has none)."""
    state = base_model(model).state_dict()
    return [state[k] for k in sorted(state) if "lora_" not in k]


def base_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the base weights: written into each adapter checkpoint,
    checked when one is loaded as model.archive, and (reference_cache) part of
    the reference cache key."""
    from prefopt.reference_cache import tensor_digest

    return tensor_digest(base_tensors(model))


def merged_archive(base: torch.nn.Module, ckpt: Path, archive: str) -> torch.nn.Module:
    """model.archive=<an adapter checkpoint>: its adapters loaded on `base`
    (built from model.*) and folded into the weights, so that the run starts
    from exactly the model that checkpoint was (and, with peft=lora, trains
    fresh adapters on top; its reference is this merged model). The base must
    be the one the adapters were trained on: checked by its digest."""
    import json

    from peft import PeftModel

    recorded = json.loads((ckpt / "prefopt_state.json").read_text()).get("base_sha256") \
        if (ckpt / "prefopt_state.json").is_file() else None
    if recorded is None:
        raise ConfigError(f"model.archive={archive} holds adapters but no record of their base weights "
                          "(prefopt_state.json base_sha256); start from its merged/ export instead")
    if base_digest(base) != recorded:
        raise ConfigError(f"model.archive={archive} holds adapters trained on other base weights than model.* builds "
                          "here (a different model, seed or model setting); use the run's own model and seed, or "
                          "its merged/ export")
    return PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()


def save_merged(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """A plain Hugging Face model in `directory`: a copy of the base with the
    adapters folded into its weights (the training model is left as it is)."""
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
