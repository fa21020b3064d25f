"""Activations: the bytes a micro-batch's forward saves for backward, by a
formula read off what autograd saves in transformers' Llama blocks (the
storages that torch.autograd.graph.saved_tensors_hooks sees, each once,
parameters excluded), and checked against that measurement on CPU
(tests/test_memory_plan_ranks.py). Per token of a row of length T, with
hidden size H, MLP size I, nh query heads of size d, compute dtype of c bytes:

  each decoder block, no checkpointing
    2 RMSNorms     the fp32 input (or its fp32 copy when c < 4): 4 H, the
                   normalized and the scaled output: 2 c H (the normalized
                   one only when the norm's weight trains), rsqrt: 4
    attention      q, k, v as SDPA gets them (k, v repeated to nh heads
                   under GQA) and its output: 4 c nh d; log-sum-exp: 4 nh;
                   the boolean mask as a float, per block: c T
    MLP            gate, SiLU(gate), up, their product: 4 c I
    LoRA           each adapted linear's A output: c r
  each decoder block, activation checkpointing
    its input:     c H; in backward one block is recomputed at a time and
                   holds the whole set above (the `recompute` term)
  outside the blocks
    final norm     4 H + c H (+4); token ids: 8; RoPE cos and sin: 2 c d
                   (not with checkpointing: a checkpointed block keeps them
                   unsaved, as keyword inputs)
    LM head        only at the S scored positions (losses.gathered_logps):
                   its input c H and the fp32 log-softmax 4 V per scored
                   token, plus three int64 and one fp32 index per scored token
With parameters frozen (LoRA), autograd saves nothing before the first
tensor that needs a gradient: no token ids, no normalized input of the
first norm, no LM-head input.

The formula is exact for Llama-type models on CPU in fp32 up to the loss's
few bytes per pair; on a GPU the attention kernel (flash / memory-efficient)
saves about the same (q, k, v, output, log-sum-exp), other architectures
(GPT-2's LayerNorm, GELU, fused QKV) get the same per-block terms as an estimate.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as the model sees it: `rows` sequences of `length`
    tokens (padded), `scored` of which get logits, `shared_positions`: the
    rows carry their own position ids (share_prompt) instead of one shared row."""

    rows: int
    length: int
    scored: int
    shared_positions: bool = True

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def worst_case_shape(pairs: int, max_length: int, two_sequences: bool, share_prompt: bool) -> BatchShape:
    """The largest micro-batch of `pairs` a run can see: every response as
    long as max_length allows. share_prompt puts prompt + chosen + rejected in
    one row (at most 2 max_length tokens); otherwise chosen and rejected are
    rows of their own (max_length each); SFT has one row per example."""
    if two_sequences and share_prompt:
        return BatchShape(pairs, 2 * max_length, 2 * pairs * max_length, True)
    rows = pairs * (2 if two_sequences else 1)
    return BatchShape(rows, max_length, rows * max_length, False)


@dataclass(frozen=True)
class Geometry:
    """What the formula needs of a model config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> Geometry:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = _first(config, "hidden_size", "n_embd")
        heads = _first(config, "num_attention_heads", "n_head")
        return cls(hidden=hidden, intermediate=_first(config, "intermediate_size", "n_inner") or 4 * hidden,
                   layers=_first(config, "num_hidden_layers", "n_layer"), heads=heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size)


def _first(config, *names):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def block_bytes(g: Geometry, shape: BatchShape, c: int, lora_rank_sum: int = 0, frozen: bool = False) -> int:
    """Bytes one decoder block saves for backward, without checkpointing."""
    norm = 4 * g.hidden + (1 if frozen else 2) * c * g.hidden + 4
    attention = 4 * c * g.heads * g.head_dim + 4 * g.heads + c * shape.length
    mlp = 4 * c * g.intermediate
    return shape.tokens * (2 * norm + attention + mlp + c * lora_rank_sum)


def outside_bytes(g: Geometry, shape: BatchShape, c: int, frozen: bool = False, checkpointing: bool = False) -> int:
    """Bytes saved outside the blocks: final norm, token ids, RoPE (saved by
    the blocks' rotations; a checkpointed block keeps its keyword inputs
    unsaved), LM head."""
    rope_rows = shape.rows if shape.shared_positions else 1
    final_norm = shape.tokens * (4 * g.hidden + (0 if frozen else c * g.hidden) + 4)
    ids = 0 if frozen else 8 * shape.tokens
    rope = 0 if checkpointing else 2 * c * rope_rows * shape.length * g.head_dim
    head = shape.scored * ((0 if frozen else c * g.hidden) + 4 * g.vocab + 3 * 8 + 4)
    return final_norm + ids + rope + head


def first_block_saving(g: Geometry, shape: BatchShape, c: int, frozen: bool) -> int:
    """With frozen weights the first block's input needs no gradient: its
    first norm saves only the scaled output its adapters read."""
    return shape.tokens * (4 * g.hidden + 4) if frozen else 0


def activation_bytes(g: Geometry, shape: BatchShape, c: int, checkpointing: bool,
                     lora_rank_sum: int = 0) -> dict[str, int]:
    """{saved: bytes saved for backward at the end of the forward, recompute:
    what backward adds on top with checkpointing (one block rebuilt), peak:
    their sum}. `lora_rank_sum`: the ranks of a block's adapters added up
    (frozen base weights when > 0)."""
    frozen = lora_rank_sum > 0
    block = block_bytes(g, shape, c, lora_rank_sum, frozen)
    outside = outside_bytes(g, shape, c, frozen, checkpointing)
    if checkpointing:
        saved, recompute = g.layers * shape.tokens * c * g.hidden + outside, block
    else:
        saved, recompute = g.layers * block - first_block_saving(g, shape, c, frozen) + outside, 0
    return {"saved": saved, "recompute": recompute, "peak": saved + recompute}


def logits_workspace(g: Geometry, shape: BatchShape) -> int:
    """The LM head's temporaries beyond what is saved: the fp32 logits next
    to their log-softmax in forward, the gradient of both in backward."""
    return 2 * 4 * shape.scored * g.vocab
