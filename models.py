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
    latest = path / "checkpoints" / "LATEST"
    if latest.is_file():
        path = path / "checkpoints" / latest.read_text().strip()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.archive={archive} is not a Hugging Face checkpoint (no config.json); "
            "pass a run directory or its checkpoints/step-<n> folder"
        )
    return path


def build_tokenizer(model_cfg):
    if model_cfg.get("archive"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_archive(model_cfg.archive), local_files_only=True)
    if model_cfg.tokenizer == "bytes":
        return byte_tokenizer()
    raise ConfigError(f"model.tokenizer={model_cfg.tokenizer} is unknown; use 'bytes' or set model.archive")


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
        model = AutoModelForCausalLM.from_pretrained(
            resolve_archive(model_cfg.archive), dtype=dtype, local_files_only=True,
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        )
    elif model_cfg.init == "config":
        model = AutoModelForCausalLM.from_config(transformers_config(model_cfg, tokenizer), dtype=dtype)
    else:
        raise ConfigError(f"model.init={model_cfg.init} is unknown; use 'config' or set model.archive")
    return model.to(device)
