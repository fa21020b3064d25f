"""Losses: SFT, the DPO family and KTO, as small pure functions on
log-probabilities, one registry entry each.

The trainer turns a batch into per-sequence log-probabilities of the response
tokens (prompt tokens masked out, `SeqLogps`) and hands them to the configured
`LossSpec`; nothing in this file knows about models, batches or devices.

A loss is one entry in `LOSSES`: its function (formula in the docstring's
first line), the data it learns from (pairs, the chosen response alone, or
unpaired rows), whether it needs a frozen reference model, and its name in
Hugging Face TRL. Its config keys are its function's keyword-only parameters
with their defaults, plus the modifiers its kind of loss accepts (`PAIR_KEYS`,
`REFERENCE_KEYS`); `register_configs` turns each entry into the Hydra node
`loss=<name>` (no YAML per loss). `loss=sum` adds several pair losses with
weights (`loss.terms`, `loss.weights`: TRL's `loss_type=[...]` with
`loss_weights`); `loss=rpo` and `loss=mpo` are two such sums, preset.
"""
from __future__ import annotations

import inspect
import math
import re
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
                   with_sum_sq: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) of the scored tokens listed by collate: the state at flat
    position rows[j] of `states` predicts token targets[j].

    states: (N, T, H) final hidden states with `head` the LM head, or
    (N, T, V) logits with head=None. The head runs only on the scored rows:
    prompt and padding positions never get logits, which is most of the
    head's work and memory when the vocabulary is large and prompts long.
    Returns the (n_scored,) token log-probs and, with `with_sum_sq` (WPO),
    log sum_v p_v^2 of each of those positions (no gradient), else None.
    """
    picked = states.reshape(-1, states.shape[-1]).index_select(0, rows)
    logits = (head(picked) if head is not None else picked).float()
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    log_sum_sq = None
    if with_sum_sq:
        with torch.no_grad():   # log sum p^2 = logsumexp(2 z) - 2 logsumexp(z)
            log_sum_sq = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    return token_logps, log_sum_sq


@dataclass(frozen=True)
class SeqLogps:
    """Per logical sequence of a batch (the B chosen, then the B rejected):
    `sums` the summed response log-probs, `tokens` the response lengths,
    `weighted` the LD-DPO length-desensitized sums when loss.ld_alpha is set,
    `wpo` the mean of log p - log sum_v p_v^2 over each response when
    loss.use_weighting (detached)."""

    sums: torch.Tensor
    tokens: torch.Tensor
    weighted: torch.Tensor | None = None
    wpo: torch.Tensor | None = None

    @property
    def scored(self) -> torch.Tensor:
        """What the loss compares: the LD-DPO sums when set, else the plain sums."""
        return self.weighted if self.weighted is not None else self.sums


def sequence_stats(token_logps: torch.Tensor, seq: torch.Tensor, n_scored: torch.Tensor,
                   ld_alpha: float | None = None, log_sum_sq: torch.Tensor | None = None) -> SeqLogps:
    """Token log-probs, token j counting towards sequence seq[j] -> `SeqLogps`.
    The tokens of one sequence are consecutive and in order (collate lists
    them so in both layouts), so a token's position in its response is its
    distance from the start of its run.

    LD-DPO (Liu et al., 2024, arXiv:2409.06411): the first min(|y_w|, |y_l|)
    tokens of each response of a pair count fully, the longer one's tail
    with weight ld_alpha: log pi = shared + ld_alpha * tail (as TRL sums it)."""
    n = n_scored.shape[0]
    sums = token_logps.new_zeros(n).index_add(0, seq, token_logps)
    weighted = None
    if ld_alpha is not None:
        b = n // 2
        shared = torch.minimum(n_scored[:b], n_scored[b:]).repeat(2)
        in_shared = _positions_in_runs(seq) < shared[seq]
        shared_sum = token_logps.new_zeros(n).index_add(0, seq, token_logps * in_shared)
        tail_sum = token_logps.new_zeros(n).index_add(0, seq, token_logps * ~in_shared)
        weighted = shared_sum + ld_alpha * tail_sum
    wpo = None
    if log_sum_sq is not None:
        aligned = (token_logps - log_sum_sq).detach()
        wpo = token_logps.new_zeros(n).index_add(0, seq, aligned) / n_scored.clamp(min=1)
    return SeqLogps(sums, n_scored, weighted, wpo)


def _positions_in_runs(seq: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... within each run of equal values of `seq`."""
    index = torch.arange(seq.shape[0], device=seq.device)
    starts = torch.ones_like(seq, dtype=torch.bool)
    starts[1:] = seq[1:] != seq[:-1]
    return index - index[starts][torch.cumsum(starts, 0) - 1]


# ----------------------------------------------------------------------------
# What a pair loss reads.

@dataclass(frozen=True)
class Pairs:
    """One micro-batch of B pairs, w the chosen and l the rejected response:
        policy_*, reference_*   summed log pi(y|x), log ref(y|x) (0 when reference-free)
        chosen, rejected        the log-ratios log pi(y|x) - log ref(y|x)
        chosen_scores, ...      f'(pi/ref) of the f-DPO divergence (= the log-ratios for reverse KL)
        margin  h = score_w - score_l; for reverse KL [log pi(w) - log pi(l)] - [log ref(w) - log ref(l)],
                computed in that order (bit-identical to the original DPO code)
        *_tokens                response lengths
        nll                     the SFT term: mean -log p per chosen token over the batch
        desirable               KTO only: the label of each row ("rejected" then holds its KL completion)
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    nll: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    margin: torch.Tensor
    desirable: torch.Tensor | None = None

    @property
    def chosen(self) -> torch.Tensor:
        return self.policy_chosen - self.reference_chosen

    @property
    def rejected(self) -> torch.Tensor:
        return self.policy_rejected - self.reference_rejected

    def per_token(self, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chosen and a rejected per-response quantity divided by its response's length."""
        return chosen / self.chosen_tokens.clamp(min=1), rejected / self.rejected_tokens.clamp(min=1)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(logratio: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(pi/ref) of f-DPO (Wang et al., 2023, arXiv:2309.16240), from u = log(pi/ref):
    reverse KL: u; forward KL: 1 - e^-u; JS: log 2 + log sigmoid(u);
    alpha-divergence: (e^((alpha-1) u) - 1) / (alpha - 1) (reverse KL at alpha = 1)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    t = ((alpha - 1.0) * logratio).float().clamp(max=80.0)   # e^80 stays finite in fp32
    return (torch.exp(t) - 1.0).to(logratio.dtype) / (alpha - 1.0)


def make_pairs(policy: SeqLogps, reference: torch.Tensor, f_divergence_type: str = "reverse_kl",
               f_alpha_divergence_coef: float = 0.5, desirable: torch.Tensor | None = None) -> Pairs:
    """`Pairs` from the policy's `SeqLogps` and the reference's (2B,) log-probs."""
    b = policy.sums.shape[0] // 2
    lp = policy.scored
    pi_w, pi_l, ref_w, ref_l = lp[:b], lp[b:], reference[:b], reference[b:]
    if f_divergence_type == "reverse_kl":
        score_w, score_l = pi_w - ref_w, pi_l - ref_l
        margin = (pi_w - pi_l) - (ref_w - ref_l)
    else:
        score_w = f_divergence_scores(pi_w - ref_w, f_divergence_type, f_alpha_divergence_coef)
        score_l = f_divergence_scores(pi_l - ref_l, f_divergence_type, f_alpha_divergence_coef)
        margin = score_w - score_l
    return Pairs(pi_w, pi_l, ref_w, ref_l, policy.tokens[:b], policy.tokens[b:],
                 sft_loss(policy.sums[:b], policy.tokens[:b]), score_w, score_l, margin, desirable)


def sft_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per response token over the batch:
    -sum_i logp_i / sum_i n_i. Token-averaged (not per sequence) so long and
    short answers weigh by their length, as in ordinary LM fine-tuning."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x): the logistic loss with
    a preference label flipped with probability eps."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


# ----------------------------------------------------------------------------
# The losses: each returns one loss per pair (B,). h is Pairs.margin, r_w and
# r_l the chosen and rejected log-ratios, s_w and s_l their f-DPO scores,
# |y| a response's token count, NLL the SFT term.

def dpo(p: Pairs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    eps = label_smoothing > 0 is conservative DPO (cDPO). Rafailov et al., 2023, arXiv:2305.18290."""
    return _smoothed_sigmoid(beta * p.margin, label_smoothing)


def hinge(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """max(0, 1 - beta h)
    SLiC, Zhao et al., 2023, arXiv:2305.10425."""
    return torch.relu(1 - beta * p.margin)


def ipo(p: Pairs, *, beta: float = 0.1, token_average: bool = True) -> torch.Tensor:
    """(s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2; token_average=false: (h - 1/(2 beta))^2
    token_average=false uses summed log-probs. Azar et al., 2023, arXiv:2310.12036 (Eq. 17).
    The per-token average is the form whose results the paper
    reports (TRL's loss_type=ipo, confirmed by the authors per TRL); the summed form is the DPO reference repo's."""
    if not token_average:
        return (p.margin - 1 / (2 * beta)) ** 2
    chosen, rejected = p.per_token(p.chosen_scores, p.rejected_scores)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def exo_pair(p: Pairs, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> torch.Tensor:
    """KL(softmax(beta r_w, beta r_l) || (1-eps, eps))
    = sigma(bh)(log sigma(bh) - log(1-eps)) + sigma(-bh)(log sigma(-bh) - log eps), eps > 0.
    EXO, Ji et al., 2024, arXiv:2402.00856 (Eq. 16)."""
    x = beta * p.margin
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-label_smoothing))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(label_smoothing)))


def nca_pair(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l)
    NCA, Chen et al., 2024, arXiv:2402.05369."""
    return (-F.logsigmoid(beta * p.chosen) - 0.5 * F.logsigmoid(-beta * p.chosen)
            - 0.5 * F.logsigmoid(-beta * p.rejected))


def robust(p: Pairs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """[-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
    Unbiased under preference labels flipped with rate eps. Robust DPO, Chowdhury et al., 2024, arXiv:2403.00409."""
    x = beta * p.margin
    return (-(1 - label_smoothing) * F.logsigmoid(x) + label_smoothing * F.logsigmoid(-x)) / (1 - 2 * label_smoothing)


def bco_pair(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta r_w) - log sigmoid(-beta r_l)
    BCO, Jung et al., 2024, arXiv:2404.04656."""
    return -F.logsigmoid(beta * p.chosen) - F.logsigmoid(-beta * p.rejected)


def sppo_hard(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2
    SPPO with hard win probabilities 1 and 0. Wu et al., 2024, arXiv:2405.00675 (Eq. 4.7)."""
    return (p.chosen - 0.5 / beta) ** 2 + (p.rejected + 0.5 / beta) ** 2


def aot(p: Pairs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """cDPO on sort_batch(log pi(w) - log pi(l)) - sort_batch(log ref(w) - log ref(l))
    A distributional (stochastic dominance, optimal transport) alignment. AOT, Melnyk et al., 2024, arXiv:2406.05882."""
    delta = (torch.sort(p.policy_chosen - p.policy_rejected, dim=0)[0]
             - torch.sort(p.reference_chosen - p.reference_rejected, dim=0)[0])
    return _smoothed_sigmoid(beta * delta, label_smoothing)


def aot_unpaired(p: Pairs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """cDPO on sort_batch(r_w) - sort_batch(r_l)
    Unpaired AOT. Melnyk et al., 2024, arXiv:2406.05882."""
    delta = torch.sort(p.chosen, dim=0)[0] - torch.sort(p.rejected, dim=0)[0]
    return _smoothed_sigmoid(beta * delta, label_smoothing)


def apo_zero(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """1 - sigmoid(beta r_w) + sigmoid(beta r_l)
    Raises chosen, lowers rejected (for chosen responses better than the model's own).
    APO, D'Oosterlinck et al., 2024, arXiv:2408.06266 (Eq. 7)."""
    return 1 - torch.sigmoid(beta * p.chosen) + torch.sigmoid(beta * p.rejected)


def apo_down(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """sigmoid(beta r_w) + 1 - sigmoid(beta (r_w - r_l))
    Lowers both, rejected more (for chosen responses worse than the model's own).
    APO, D'Oosterlinck et al., 2024, arXiv:2408.06266 (Eq. 8)."""
    return torch.sigmoid(beta * p.chosen) + (1 - torch.sigmoid(beta * (p.chosen - p.rejected)))


def discopop(p: Pairs, *, beta: float = 0.1, discopop_tau: float = 0.05) -> torch.Tensor:
    """(1 - m) (-log sigmoid(beta h)) + m e^(-beta h), m = sigmoid(beta h / tau)
    The log-ratio modulated loss. DiscoPOP, Chris Lu et al., 2024, arXiv:2406.08414 (Eq. 5)."""
    x = beta * p.margin
    modulation = torch.sigmoid(x / discopop_tau)
    return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation


def sigmoid_norm(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta (s_w/|y_w| - s_l/|y_l|))
    DPO on per-token average log-ratios (TRL's sigmoid_norm)."""
    chosen, rejected = p.per_token(p.chosen_scores, p.rejected_scores)
    return -F.logsigmoid(beta * (chosen - rejected))


def sft(p: Pairs) -> torch.Tensor:
    """NLL = -sum log pi(y_w|x) / sum |y_w| over the batch
    Language modelling on the chosen responses. As a term of loss=sum it is TRL's loss_type=sft (RPO's NLL)."""
    return p.nll.expand(p.policy_chosen.shape[0])


def simpo(p: Pairs, *, beta: float = 2.0, simpo_gamma: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(beta log pi(w)/|y_w| - beta log pi(l)/|y_l| - gamma)
    No reference model. SimPO, Meng et al., 2024, arXiv:2405.14734 (Eq. 6; the paper's beta 2.0-2.5,
    gamma/beta 0.3-0.8)."""
    chosen, rejected = p.per_token(p.policy_chosen, p.policy_rejected)
    return _smoothed_sigmoid(beta * (chosen - rejected) - simpo_gamma, label_smoothing)


def cpo(p: Pairs, *, beta: float = 0.1, cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(beta (log pi(w) - log pi(l))) + alpha NLL
    No reference model. CPO, Xu et al., 2024, arXiv:2401.08417 (Eq. 3 plus the NLL term of its Eq. 6)."""
    return _smoothed_sigmoid(beta * (p.policy_chosen - p.policy_rejected), label_smoothing) + cpo_alpha * p.nll


def orpo(p: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """NLL - beta log sigmoid(log odds(w) - log odds(l)), odds = P/(1-P), log P = log pi(y|x)/|y|
    No reference model; beta is the paper's lambda. ORPO, Hong et al., 2024, arXiv:2403.07691
    (Eqs. 4-7)."""
    avg_w, avg_l = p.per_token(p.policy_chosen, p.policy_rejected)
    log_odds = (avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))
    return p.nll - beta * F.logsigmoid(log_odds)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kto(p: Pairs, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
        ) -> torch.Tensor:
    """w_D (1 - sigmoid(beta (r - z))) if desirable, else w_U (1 - sigmoid(beta (z - r)))
    z = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)) with y' the completion of another row
    (the KL reference point, no gradient); w_D, w_U the desirable and undesirable weights.
    KTO, Ethayarajh et al., 2024, arXiv:2402.01306 (Eq. 7).
    Rows are unpaired: p.chosen is each row's log-ratio, p.rejected that of its mismatched KL completion. The
    KL estimate is over this process's micro-batch."""
    kl = p.rejected.mean().detach().clamp(min=0)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (p.chosen - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - p.chosen)))
    return torch.where(p.desirable, desirable, undesirable)


# ----------------------------------------------------------------------------
# The registry.

# Modifiers, by what they need: every pair loss takes PAIR_KEYS, every loss
# with a reference model REFERENCE_KEYS. Names and defaults are TRL's.
PAIR_KEYS = {
    "ld_alpha": None,           # LD-DPO: weight of the longer response's tail tokens (null = off; 1.0 = plain sums)
    "use_weighting": False,     # WPO: weight each pair by its responses' length-normalized probabilities
}
REFERENCE_KEYS = {
    "reference_free": False,        # no reference model: its log-probs are taken as 0
    "precompute_reference": False,  # reference log-probs computed once before training (no reference forward per step)
    "f_divergence_type": "reverse_kl",  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence
    "f_alpha_divergence_coef": 0.5,     # alpha of alpha_divergence
    "sync_ref_model": False,        # TR-DPO: every ref_model_sync_steps, ref <- alpha * policy + (1 - alpha) * ref
    "ref_model_mixup_alpha": 0.6,
    "ref_model_sync_steps": 512,
}
# Range checks by key name, shared by every loss that takes the key.
KEY_CHECKS = {
    "beta": (lambda v: v > 0, "must be > 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    "ld_alpha": (lambda v: v is None or 0 <= v <= 1, "must be null or in [0, 1]"),
    "f_divergence_type": (lambda v: v in F_DIVERGENCES, f"must be one of {', '.join(F_DIVERGENCES)}"),
    "discopop_tau": (lambda v: v > 0, "must be > 0"),
    "cpo_alpha": (lambda v: v >= 0, "must be >= 0"),
    "desirable_weight": (lambda v: v > 0, "must be > 0"),
    "undesirable_weight": (lambda v: v > 0, "must be > 0"),
    "ref_model_mixup_alpha": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "ref_model_sync_steps": (lambda v: v >= 1, "must be >= 1"),
}


@dataclass(frozen=True)
class LossEntry:
    fn: Callable
    data: str = "pairs"            # pairs | chosen (the chosen response alone: SFT) | unpaired (KTO rows)
    needs_reference: bool = True   # a frozen reference model (unless loss.reference_free)
    trl: str | None = None         # TRL's name: DPOConfig.loss_type, or the trainer that has it
    f_divergence: bool = False     # TRL allows a non-default f_divergence_type with it
    sorts_batch: bool = False      # compares sorted batches, so per-pair weights (WPO) cannot apply

    @property
    def own_keys(self) -> dict:
        """The function's keyword-only parameters and their defaults."""
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values() if p.kind == p.KEYWORD_ONLY}

    @property
    def keys(self) -> dict:
        """Config keys and defaults: the function's own and the modifiers of its kind."""
        pair = PAIR_KEYS if self.data == "pairs" else {}
        reference = REFERENCE_KEYS if self.needs_reference and self.data == "pairs" else {}
        return {**self.own_keys, **pair, **reference}

    @property
    def formula(self) -> str:
        """The first line of the function's docstring."""
        return inspect.getdoc(self.fn).split("\n")[0]

    @property
    def paper(self) -> str:
        """The citation in the function's docstring ("Name et al., year, arXiv:id")."""
        found = re.search(r"(\S+ et al\., \d{4}, arXiv:\d+\.\d+)", " ".join(inspect.getdoc(self.fn).split()))
        return found.group(1) if found else ""


LOSSES = {
    "sft": LossEntry(sft, data="chosen", needs_reference=False, trl="sft; SFTTrainer"),
    "dpo": LossEntry(dpo, trl="sigmoid", f_divergence=True),
    "hinge": LossEntry(hinge, trl="hinge", f_divergence=True),
    "ipo": LossEntry(ipo, trl="ipo", f_divergence=True),
    "exo_pair": LossEntry(exo_pair, trl="exo_pair", f_divergence=True),
    "nca_pair": LossEntry(nca_pair, trl="nca_pair"),
    "robust": LossEntry(robust, trl="robust", f_divergence=True),
    "bco_pair": LossEntry(bco_pair, trl="bco_pair"),
    "sppo_hard": LossEntry(sppo_hard, trl="sppo_hard"),
    "aot": LossEntry(aot, trl="aot", sorts_batch=True),
    "aot_unpaired": LossEntry(aot_unpaired, trl="aot_unpaired", sorts_batch=True),
    "apo_zero": LossEntry(apo_zero, trl="apo_zero"),
    "apo_down": LossEntry(apo_down, trl="apo_down"),
    "discopop": LossEntry(discopop, trl="discopop", f_divergence=True),
    "sigmoid_norm": LossEntry(sigmoid_norm, trl="sigmoid_norm", f_divergence=True),
    "simpo": LossEntry(simpo, needs_reference=False, trl="CPOTrainer loss_type=simpo (experimental)"),
    "cpo": LossEntry(cpo, needs_reference=False, trl="CPOTrainer (experimental)"),
    "orpo": LossEntry(orpo, needs_reference=False, trl="ORPOTrainer (experimental)"),
    "kto": LossEntry(kto, data="unpaired", trl="KTOTrainer"),
}
# TRL's names for ours, so that a TRL config maps one to one: loss=sigmoid is loss=dpo.
ALIASES = {"sigmoid": "dpo"}
# loss=sum adds pair losses (TRL's loss_type=[...] with loss_weights); these are named sums, preset.
SUMS = {
    "sum": ([], []),
    "rpo": (["dpo", "sft"], [1.0, 1.0]),                      # RPO: DPO + NLL on the chosen response (TRL's docs)
    "mpo": (["dpo", "bco_pair", "sft"], [0.8, 0.2, 1.0]),     # MPO: preference + quality + generation (TRL's docs)
}
SUM_PAPERS = {"rpo": "Pang et al., 2024, arXiv:2404.19733", "mpo": "Wang et al., 2024, arXiv:2411.10442"}
SUM_TERMS = [name for name, e in LOSSES.items() if e.data == "pairs" or name == "sft"]


def sum_keys() -> dict:
    """The keys of a loss=sum node: `terms`, `weights` and every pair loss's
    keys (a key several terms share, such as beta, is one value for all)."""
    keys = dict(LOSSES["dpo"].keys)   # dpo's default wins for a shared key
    for name in SUM_TERMS:
        for key, default in LOSSES[name].keys.items():
            keys.setdefault(key, default)
    return keys


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    params: dict

    @property
    def entry(self) -> LossEntry:
        return LOSSES[self.name]


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor          # the scalar to minimise
    metrics: dict               # name (without the split) -> detached scalar tensor


@dataclass(frozen=True)
class LossSpec:
    """The configured loss: its terms (one unless loss=sum), the modifiers,
    and what the trainer must build for it."""

    name: str
    terms: tuple[Term, ...]
    options: dict = field(default_factory=dict)   # values of PAIR_KEYS and REFERENCE_KEYS

    @property
    def data(self) -> str:
        return "pairs" if self.name in SUMS else self.terms[0].entry.data

    @property
    def two_sequences(self) -> bool:
        """Does a batch row hold two responses (pairs, or an unpaired row and its KL completion)?"""
        return self.data != "chosen"

    @property
    def needs_reference(self) -> bool:
        return any(t.entry.needs_reference for t in self.terms) and not self.options.get("reference_free", False)

    @property
    def beta(self) -> float:
        return next((t.params["beta"] for t in self.terms if "beta" in t.params), 0.0)

    @property
    def ld_alpha(self) -> float | None:
        return self.options.get("ld_alpha")

    @property
    def use_weighting(self) -> bool:
        return bool(self.options.get("use_weighting", False))

    def __call__(self, policy: SeqLogps, reference: torch.Tensor | None = None,
                 desirable: torch.Tensor | None = None) -> LossOutput:
        """The loss of one micro-batch: sum over terms of weight * mean over pairs (times the WPO weight of
        each pair when loss.use_weighting), and its metrics. `reference`: (2B,) log-probs (zeros when
        reference-free); `desirable`: (B,) labels for unpaired rows."""
        if self.data == "chosen":
            loss = sft_loss(policy.sums, policy.tokens)
            return LossOutput(loss, {"loss": loss.detach(), "logps/chosen": policy.sums.detach().mean()})
        if reference is None or not self.needs_reference:   # reference-free: log ref = 0
            reference = torch.zeros_like(policy.sums)
        p = make_pairs(policy, reference, self.options.get("f_divergence_type", "reverse_kl"),
                       self.options.get("f_alpha_divergence_coef", 0.5), desirable)
        pair_weights = None
        if self.use_weighting:
            b = p.policy_chosen.shape[0]
            pair_weights = torch.exp(policy.wpo[:b]) * torch.exp(policy.wpo[b:])
        loss, terms = 0.0, {}
        for term in self.terms:
            per_pair = term.entry.fn(p, **term.params)
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            value = per_pair.mean()
            terms[term.name] = value.detach()
            loss = loss + value * term.weight
        metrics = {"loss": loss.detach(), **(({f"loss/{k}": v for k, v in terms.items()}) if len(terms) > 1 else {})}
        metrics.update(self._reward_metrics(p))
        return LossOutput(loss, metrics)

    def _reward_metrics(self, p: Pairs) -> dict:
        """beta * log-ratio as the implicit reward; for unpaired rows, the
        desirable and undesirable rows' means and the KL estimate."""
        beta = self.beta
        if self.data == "unpaired":   # "chosen" = the desirable rows, "rejected" = the undesirable ones
            rewards, logps = beta * p.chosen.detach(), p.policy_chosen.detach()
            out = {"kl": p.rejected.detach().mean().clamp(min=0)}
            for name, mask in (("chosen", p.desirable), ("rejected", ~p.desirable)):
                # always logged (ranks must agree on the keys); NaN when the batch has no such row
                out[f"rewards/{name}"] = rewards[mask].mean()
                out[f"logps/{name}"] = logps[mask].mean()
            return out
        chosen, rejected = beta * p.chosen.detach(), beta * p.rejected.detach()
        return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/accuracies": (chosen > rejected).float().mean(),
                "rewards/margins": (chosen - rejected).mean(),
                "logps/chosen": p.policy_chosen.detach().mean(), "logps/rejected": p.policy_rejected.detach().mean()}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def _checked(key: str, value, default):
    """`value` of loss.`key` in its default's type, range-checked (KEY_CHECKS)."""
    check = KEY_CHECKS.get(key)
    try:
        if value is not None and isinstance(default, bool):
            value = bool(value)
        elif value is not None and isinstance(default, (int, float)):
            value = type(default)(value)
        elif key == "ld_alpha" and value is not None:
            value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"loss.{key}={value!r} should be a number") from None
    if check and not check[0](value):
        raise ConfigError(f"loss.{key}={value} {check[1]}")
    return value


def build_loss(loss_cfg) -> LossSpec:
    """The LossSpec of `loss_cfg` (the `loss` config node), its values checked."""
    name = canonical_name(loss_cfg.name)
    if name in SUMS:
        return _build_sum(name, loss_cfg)
    if name not in LOSSES:
        raise ConfigError(f"loss={name} is unknown; choose one of {', '.join(all_names())}")
    return _finish(name, [(name, 1.0)], loss_cfg)


def _build_sum(name: str, loss_cfg) -> LossSpec:
    terms = [canonical_name(t) for t in (loss_cfg.get("terms") or SUMS[name][0])]
    if not terms:
        raise ConfigError(f"loss={name} needs loss.terms, e.g. 'loss.terms=[dpo,sft]' 'loss.weights=[1.0,1.0]'")
    unknown = [t for t in terms if t not in SUM_TERMS]
    if unknown:
        raise ConfigError(f"loss.terms: {unknown[0]} cannot be a term of loss={name}; choose among "
                          f"{', '.join(SUM_TERMS)}")
    if len(set(terms)) != len(terms):
        raise ConfigError(f"loss.terms={terms} names a loss twice; give it one weight instead")
    preset = SUMS[name][1] if not loss_cfg.get("terms") else None
    weights = [float(w) for w in (loss_cfg.get("weights") or preset or [1.0] * len(terms))]
    if len(weights) != len(terms):
        raise ConfigError(f"loss.weights has {len(weights)} values for {len(terms)} loss.terms; give one weight "
                          "per term (or none: all 1.0)")
    return _finish(name, list(zip(terms, weights)), loss_cfg)


def _finish(name: str, named_weights: list, loss_cfg) -> LossSpec:
    terms = []
    for term_name, weight in named_weights:
        params = {k: _checked(k, loss_cfg.get(k, d), d) for k, d in LOSSES[term_name].own_keys.items()}
        terms.append(Term(term_name, weight, params))
    modifiers = {**PAIR_KEYS, **REFERENCE_KEYS}
    options = {k: _checked(k, loss_cfg.get(k, d), d) for k, d in modifiers.items() if k in loss_cfg}
    spec = LossSpec(name, tuple(terms), options)
    _check_combination(spec)
    return spec


def _check_combination(spec: LossSpec) -> None:
    """Settings that TRL refuses, or that cannot mean anything, refused with one line."""
    o, names = spec.options, [t.name for t in spec.terms]
    kind = o.get("f_divergence_type", "reverse_kl")
    if kind != "reverse_kl":
        bad = [t.name for t in spec.terms if not (t.entry.f_divergence or t.name == "sft")]
        if bad:
            allowed = ", ".join(n for n, e in LOSSES.items() if e.f_divergence)
            raise ConfigError(f"loss.f_divergence_type={kind} does not apply to loss {bad[0]} (its reference terms "
                              f"do not cancel); it applies to {allowed}")
    if spec.use_weighting and any(t.entry.sorts_batch for t in spec.terms):
        raise ConfigError(f"loss.use_weighting=true cannot weight loss={names[0]}: it sorts the batch, so "
                          "per-pair weights do not line up")
    for t in spec.terms:
        if t.name == "exo_pair" and t.params["label_smoothing"] == 0:
            raise ConfigError("loss=exo_pair needs loss.label_smoothing > 0 (its log eps term; the paper uses 1e-3)")
    if o.get("sync_ref_model"):
        if not spec.needs_reference:
            raise ConfigError("loss.sync_ref_model=true needs a reference model; this loss has none")
        if o.get("precompute_reference"):
            raise ConfigError("loss.sync_ref_model=true moves the reference during training, so its log-probs "
                              "cannot be precomputed; set loss.precompute_reference=false")


def all_names() -> list[str]:
    """Every value `loss=` accepts."""
    return [*LOSSES, *SUMS, *ALIASES]


def register_configs() -> None:
    """One Hydra config node per loss, `loss=<name>`, holding its keys; an
    alias's node records the canonical name (config.yaml says what ran)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, entry in LOSSES.items():
        store.store(group="loss", name=name, node={"name": name, **entry.keys})
    for alias, name in ALIASES.items():
        store.store(group="loss", name=alias, node={"name": name, **LOSSES[name].keys})
    for name, (terms, weights) in SUMS.items():
        store.store(group="loss", name=name, node={"name": name, "terms": terms, "weights": weights, **sum_keys()})


# ----------------------------------------------------------------------------
# The loss table of README.md, made from the registry: `python -m prefopt.losses`.

def loss_table() -> str:
    """Markdown: every `loss=` value with its one-line formula, whether it
    needs a reference model, its TRL name and its paper."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| `loss=` | formula (per pair, averaged over the batch) | reference | TRL | paper |",
             "|---|---|---|---|---|"]
    for name, e in LOSSES.items():
        alias = [a for a, n in ALIASES.items() if n == name]
        shown = f"`{name}`" + "".join(f" (`{a}`)" for a in alias)
        lines.append(f"| {shown} | {cell(e.formula)} | {'yes' if e.needs_reference else 'no'} | "
                     f"{e.trl or '-'} | {e.paper or '-'} |")
    for name, (terms, weights) in SUMS.items():
        if terms:
            formula = " + ".join(f"{w:g} {t}" for t, w in zip(terms, weights))
            trl = f"loss_type={[ALIASES_TRL.get(t, t) for t in terms]}, loss_weights={weights}".replace("'", "")
            reference = "yes" if any(LOSSES[t].needs_reference for t in terms) else "no"
        else:
            formula, trl = "sum over loss.terms of weight * term (loss.weights, default 1 each)", "loss_weights"
            reference = "if a term does"
        lines.append(f"| `{name}` | {formula} | {reference} | {trl} | {SUM_PAPERS.get(name, '-')} |")
    return "\n".join(lines)


ALIASES_TRL = {ours: trl for trl, ours in ALIASES.items()}   # dpo -> sigmoid


if __name__ == "__main__":
    print(loss_table())
