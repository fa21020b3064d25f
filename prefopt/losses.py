"""Losses: SFT and the DPO family, as small pure functions on log-probabilities,
one registry entry each.

The trainer turns a batch into per-sequence summed log-probabilities of the
response tokens (prompt tokens masked out) and hands them here; nothing in this
file knows about models, batches or devices.

A loss is one entry in `LOSSES`: its function, whether it compares a chosen
with a rejected response (`preference`) and whether it needs a frozen
reference model. Its config keys are its function's keyword-only parameters
with their defaults, plus, for preference losses, `reference_free` and
`precompute_reference`; `register_configs` turns each entry into the Hydra
node `loss=<name>` (no YAML per loss). Adding a loss is one function, one
entry and its hand-computed test.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from utils import ConfigError


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


def gathered_logps(states: torch.Tensor, head: torch.nn.Module | None, rows: torch.Tensor, targets: torch.Tensor,
                   seq: torch.Tensor, n_scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


# ----------------------------------------------------------------------------
# The losses. A preference loss gets the log-ratios of one batch of pairs
# (`LogRatios`) and returns one loss per pair.

@dataclass(frozen=True)
class LogRatios:
    """With w the chosen and l the rejected response:
        chosen  = log pi(w|x) - log ref(w|x)
        rejected = log pi(l|x) - log ref(l|x)
        margin  = [log pi(w|x) - log pi(l|x)] - [log ref(w|x) - log ref(l|x)]   (h)
    (the reference terms are 0 when loss.reference_free). `margin` equals
    chosen - rejected; it is computed in this order, as TRL and the DPO
    reference repo compute it, so the losses match theirs to the last bit."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor


def dpo(r: LogRatios, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    eps = label_smoothing > 0 is conservative DPO (cDPO), an assumed label-flip rate."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * r.margin) - label_smoothing * F.logsigmoid(-beta * r.margin)


def ipo(r: LogRatios, *, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al., 2023): (h - 1 / (2 beta))^2, on summed log-probs (as the DPO reference repo)."""
    return (r.margin - 1 / (2 * beta)) ** 2


def hinge(r: LogRatios, *, beta: float = 0.1) -> torch.Tensor:
    """SLiC's hinge (Zhao et al., 2023): max(0, 1 - beta h)."""
    return torch.relu(1 - beta * r.margin)


def sft_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per response token over the batch:
    -sum_i logp_i / sum_i n_i. Token-averaged (not per sequence) so long and
    short answers weigh by their length, as in ordinary LM fine-tuning."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


# ----------------------------------------------------------------------------
# The registry.

PREFERENCE_KEYS = {
    "reference_free": False,        # no reference model: its log-probs are taken as 0
    "precompute_reference": False,  # reference log-probs computed once before training (no reference forward per step)
}
# Range checks by key name, shared by every loss that takes the key.
KEY_CHECKS = {
    "beta": (lambda v: v > 0, "must be > 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
}


@dataclass(frozen=True)
class LossEntry:
    fn: Callable
    preference: bool = True        # compares chosen with rejected (else: the chosen response alone)
    needs_reference: bool = True   # a frozen reference model (unless loss.reference_free)

    @property
    def keys(self) -> dict:
        """Config keys and defaults: the function's keyword-only parameters."""
        own = {p.name: p.default for p in inspect.signature(self.fn).parameters.values() if p.kind == p.KEYWORD_ONLY}
        return {**own, **(PREFERENCE_KEYS if self.preference else {})}


LOSSES = {
    "sft": LossEntry(sft_loss, preference=False, needs_reference=False),
    "dpo": LossEntry(dpo),
    "ipo": LossEntry(ipo),
    "hinge": LossEntry(hinge),
}


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    kind: str = "dpo",
    reference_free: bool = False,
    **params,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family, per example: the loss `kind` of LOSSES on the log-ratios
    log pi(y|x) - log ref(y|x) of the chosen and rejected responses (the
    reference terms are 0 when `reference_free`); `params` are its other keys
    (e.g. label_smoothing). Returns (losses, chosen_rewards, rejected_rewards),
    each of shape (B,), where reward = beta * (log pi(y|x) - log ref(y|x)) is
    detached (it is a metric)."""
    entry = LOSSES.get(kind)
    if entry is None or not entry.preference:
        names = ", ".join(n for n, e in LOSSES.items() if e.preference)
        raise ConfigError(f"loss={kind} is not a preference loss; choose one of {names}")
    ref_chosen = 0.0 if reference_free else reference_chosen_logps
    ref_rejected = 0.0 if reference_free else reference_rejected_logps
    ratios = LogRatios(chosen=policy_chosen_logps - ref_chosen, rejected=policy_rejected_logps - ref_rejected,
                       margin=(policy_chosen_logps - policy_rejected_logps) - (ref_chosen - ref_rejected))
    losses = entry.fn(ratios, beta=beta, **params)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@dataclass(frozen=True)
class LossSpec:
    """The configured loss: what the trainer needs to know about it."""

    name: str
    params: dict = field(default_factory=dict)   # the loss function's own keys (beta, label_smoothing, ...)
    reference_free: bool = False

    @property
    def entry(self) -> LossEntry:
        return LOSSES[self.name]

    @property
    def is_preference(self) -> bool:
        return self.entry.preference

    @property
    def needs_reference(self) -> bool:
        return self.entry.needs_reference and not self.reference_free

    @property
    def beta(self) -> float:
        return self.params.get("beta", 0.0)

    def __call__(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
        params = {k: v for k, v in self.params.items() if k != "beta"}
        return preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta,
                               self.name, self.reference_free, **params)


def build_loss(loss_cfg) -> LossSpec:
    """The LossSpec of `loss_cfg` (the `loss` config node), its values checked."""
    name = loss_cfg.name
    if name not in LOSSES:
        raise ConfigError(f"loss={name} is unknown; choose one of {', '.join(LOSSES)}")
    entry = LOSSES[name]
    params = {}
    for key, default in entry.keys.items():
        if key in PREFERENCE_KEYS:
            continue
        value = loss_cfg.get(key, default)
        check = KEY_CHECKS.get(key)
        if check and not check[0](value):
            raise ConfigError(f"loss.{key}={value} {check[1]}")
        params[key] = type(default)(value) if isinstance(default, (int, float)) else value
    return LossSpec(name, params, bool(loss_cfg.get("reference_free", False)))


def register_configs() -> None:
    """One Hydra config node per loss, `loss=<name>`, holding its keys."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, entry in LOSSES.items():
        store.store(group="loss", name=name, node={"name": name, **entry.keys})
