"""Losses: SFT and the DPO family, as small pure functions on log-probabilities.

The trainer turns a batch into per-sequence summed log-probabilities of the
response tokens (prompt tokens masked out) and hands them here; nothing in this
file knows about models, batches or devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils import ConfigError

PREFERENCE_LOSSES = ("dpo", "ipo", "hinge")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label_t | tokens_<t) over the positions whose label is not
    -100, per sequence, and the number of such positions.

    logits: (B, T, V) from a causal LM on input_ids; labels: (B, T) equal to
    input_ids with the prompt and padding set to -100. Token t is predicted by
    the logits at t-1, hence the shift.
    """
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != -100
    # cross_entropy is the fused log_softmax+gather: it never materialises a
    # second (B, T, V) tensor of log-probabilities.
    token_logps = -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(labels.shape)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def gathered_logps(states: torch.Tensor, head: torch.nn.Module | None, rows: torch.Tensor,
                   targets: torch.Tensor, seq: torch.Tensor, n_scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` with the scored tokens listed explicitly (collate
    builds the lists): the state at flat position rows[j] of `states`
    predicts token targets[j], which counts towards sequence seq[j].

    states: (N, T, H) final hidden states with `head` the LM head, or
    (N, T, V) logits with head=None. The head runs only on the scored rows:
    prompt and padding positions never get logits, which is most of the
    head's work and memory when the vocabulary is large and prompts long.
    Returns the per-sequence sums and n_scored (the counts), as sequence_logps.
    """
    picked = states.reshape(-1, states.shape[-1]).index_select(0, rows)
    logits = head(picked) if head is not None else picked
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    return token_logps.new_zeros(n_scored.shape[0]).index_add(0, seq, token_logps), n_scored


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    kind: str = "dpo",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family of losses, per example.

    With w the chosen and l the rejected response, the implicit reward margin is

        h = [log pi(w|x) - log pi(l|x)] - [log ref(w|x) - log ref(l|x)]

    (the reference terms are 0 when `reference_free`), and

        dpo   : -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
                (eps = label_smoothing > 0 is conservative DPO, cDPO)
        ipo   : (h - 1 / (2 * beta))^2
        hinge : max(0, 1 - beta * h)                         (SLiC)

    Returns (losses, chosen_rewards, rejected_rewards), each of shape (B,), where
    reward = beta * (log pi(y|x) - log ref(y|x)) is detached (it is a metric).
    """
    if kind not in PREFERENCE_LOSSES:
        raise ConfigError(f"loss={kind} is not a preference loss; choose one of {', '.join(PREFERENCE_LOSSES)}")
    policy_margin = policy_chosen_logps - policy_rejected_logps
    reference_margin = reference_chosen_logps - reference_rejected_logps
    h = policy_margin - (0.0 if reference_free else reference_margin)

    if kind == "dpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per response token over the batch:
    -sum_i logp_i / sum_i n_i. Token-averaged (not per sequence) so long and
    short answers weigh by their length, as in ordinary LM fine-tuning."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


@dataclass(frozen=True)
class LossSpec:
    """What the trainer needs to know about the configured loss."""

    name: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False

    @property
    def is_preference(self) -> bool:
        return self.name in PREFERENCE_LOSSES

    @property
    def needs_reference(self) -> bool:
        return self.is_preference and not self.reference_free


def build_loss(loss_cfg) -> LossSpec:
    name = loss_cfg.name
    if name == "sft":
        return LossSpec(name="sft")
    if name not in PREFERENCE_LOSSES:
        raise ConfigError(f"loss={name} is unknown; choose one of sft, {', '.join(PREFERENCE_LOSSES)}")
    if loss_cfg.beta <= 0:
        raise ConfigError(f"loss.beta={loss_cfg.beta} must be > 0")
    if not 0 <= loss_cfg.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing={loss_cfg.label_smoothing} must be in [0, 0.5)")
    return LossSpec(name, float(loss_cfg.beta), float(loss_cfg.label_smoothing), bool(loss_cfg.reference_free))
