"""What a causal LM is made of, found from its structure (config and module
types, not parameter-name guessing): its repeated decoder blocks, its text
config, and which model types the fast paths are verified for. FSDP shards
per decoder block and Adam-mini's parameter roles look inside them; both ask
here."""
from __future__ import annotations

from torch import nn

# Model types whose logits are exactly lm_head(final hidden state) and which
# use a 4-D attention mask and position ids as given: for them the head runs
# only where a token is scored, and share_prompt packs a pair into one row.
PLAIN_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3")
SHARED_PROMPT_MODELS = PLAIN_HEAD_MODELS


def text_config(model: nn.Module):
    """The language model's config (multimodal wrappers keep it inside)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def decoder_blocks(model: nn.Module, cfg=None) -> list[nn.Module]:
    """The repeated transformer blocks: the ModuleList of num_hidden_layers
    modules of one class, each containing an attention module
    (model.model.layers for Llama, transformer.h for GPT-2...)."""
    n_layers = getattr(cfg if cfg is not None else text_config(model), "num_hidden_layers", None)
    if not n_layers:
        return []
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module) == n_layers and len({type(m) for m in module}) == 1
                and any(is_attention(m) for m in module[0].modules())):
            return list(module)
    return []


def embedding_weights(model: nn.Module) -> set[int]:
    """ids of the input and output embedding matrices (one id when tied):
    the parameters that weight decay and Muon treat apart from other matrices."""
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    return {id(m.weight) for m in modules if m is not None}
