"""The loss family against Hugging Face TRL's own loss code (trl==1.16.0, the
version requirements-bench.txt pins), on one fixed batch.

TRL computes its losses inside trainer methods, not pure functions, so they are
called unbound with a stand-in `self` (a SimpleNamespace holding exactly the
attributes they read) and a stand-in model (`FakeLM`) that returns fixed
per-token log-probabilities, as TRL's fused LM head would:

    DPOTrainer._compute_loss / compute_ref_log_probs   every DPOConfig.loss_type and modifier
    KTOTrainer._compute_loss / _compute_kl_logps        KTO
    CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss    SimPO, CPO, ORPO (trl.experimental)

Ours gets the same per-token values through `sequence_stats`, the way the
trainer hands them over. Inputs are float64 so that the two agree to 1e-6
wherever they compute the same formula. TRL is pinned in requirements-test.txt.
"""
import contextlib
import math
import os
import types
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.losses import LOSSES, build_loss, register_configs, sequence_stats
from utils import ConfigError

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import trl.trainer.dpo_trainer as _dpo_module  # noqa: E402  (after the env var that silences its experimental warning)
import trl.trainer.kto_trainer as _kto_module  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

DPOTrainer, KTOTrainer = _dpo_module.DPOTrainer, _kto_module.KTOTrainer

TOL = 1e-6
B = 4
PROMPT_LENS, CHOSEN_LENS, REJECTED_LENS = (2, 4, 1, 3), (3, 5, 2, 6), (4, 2, 5, 3)
# TRL's DPOConfig.loss_type values (the list of its "Unknown loss type" error) and those it allows a
# non-default f_divergence_type with (DPOTrainer.__init__, `f_divergence_loss_types`).
TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
TRL_F_DIVERGENCE = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
OURS = {"sigmoid": "dpo"}   # TRL's name -> ours, where they differ
REWARD_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected"]


# ----------------------------------------------------------------------------
# The fixed inputs.

def flat(values: torch.Tensor, mask: torch.Tensor, first_seq: int = 0):
    """(R, T-1) per-token values -> the flat scored tokens, the sequence of each, the lengths: the layout
    `sequence_stats` reads (row r is sequence first_seq + r, its tokens consecutive and in order)."""
    return values[mask], torch.nonzero(mask)[:, 0] + first_seq, mask.sum(1)


def random_logps(g: torch.Generator, mask: torch.Tensor, dtype, low=0.05, high=3.0) -> torch.Tensor:
    """-U(low, high) at the scored positions, 0 elsewhere (as TRL's fused head returns for labels -100)."""
    return torch.where(mask, -(low + (high - low) * torch.rand(mask.shape, generator=g, dtype=dtype)), 0)


def near(g: torch.Generator, logps: torch.Tensor, mask: torch.Tensor, spread: float) -> torch.Tensor:
    """Another model's log-probs of the same tokens: logps + U(-spread, spread), kept < 0."""
    noise = spread * (2 * torch.rand(logps.shape, generator=g, dtype=logps.dtype) - 1)
    return torch.where(mask, (logps + noise).clamp(max=-0.01), 0)


@dataclass(frozen=True)
class Batch:
    """B pairs as TRL's DataCollatorForPreference builds them ([chosen rows..., rejected rows...], right
    padding, completion_mask 0 on the prompt) and the (2B, T-1) per-token values of the fake models."""
    inputs: dict
    mask: torch.Tensor          # completion_mask[:, 1:], the positions whose label is scored
    policy: torch.Tensor
    reference: torch.Tensor
    log_sum_sq: torch.Tensor    # log sum_v p_v^2 at each position, in [2 log p, 0]

    def chosen_only(self, values: torch.Tensor):
        return flat(values[:B], self.mask[:B])


def make_batch(seed: int = 0, dtype=torch.float64) -> Batch:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, 100, (n,), generator=g).tolist()

    examples = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
                for p, c, r in zip(PROMPT_LENS, CHOSEN_LENS, REJECTED_LENS)]
    inputs = _dpo_module.DataCollatorForPreference(pad_token_id=0)(examples)
    mask = inputs["completion_mask"][:, 1:].bool()
    policy = random_logps(g, mask, dtype)
    reference = near(g, policy, mask, spread=1.0)
    log_sum_sq = policy * (0.2 + 1.6 * torch.rand(mask.shape, generator=g, dtype=dtype))
    return Batch(inputs, mask, policy, reference, log_sum_sq)


BATCH = make_batch()
# TRL's alpha_divergence cannot take float64 (its clamp table has float16/bfloat16/float32 keys only:
# KeyError torch.float64), so that one runs on float32 inputs.
BATCH32 = make_batch(dtype=torch.float32)


class FakeLM(torch.nn.Module):
    """TRL's model with its fused LM head: `model(input_ids=..., labels=..., fused_lm_head=True)` returns
    fixed per-token outputs for each input_ids it knows. An nn.Module with no parameters, so accelerate's
    `is_peft_model` and TRL's `disable_gradient_checkpointing` treat it as a plain model."""

    def __init__(self, *table):   # (input_ids, log_probs, log_sum_sq_probs or None), ...
        super().__init__()
        self.table = table
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, labels, fused_lm_head=False, **kwargs):
        assert fused_lm_head
        for ids, log_probs, log_sum_sq in self.table:
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                # the contract of TRL's fused head: log p of label t+1 at t, 0 where the label is -100
                assert torch.equal(log_probs != 0, labels[:, 1:] != -100)
                zeros = torch.zeros_like(log_probs)
                return types.SimpleNamespace(log_probs=log_probs, log_sum_sq_probs=log_sum_sq, entropy=zeros,
                                             mean_logits=zeros, is_top1=zeros.bool())
        raise AssertionError("FakeLM was called on input_ids it does not know")


def fake_accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t,
                                 unwrap_model=lambda m: m, autocast=contextlib.nullcontext)


def fake_trainer(model, ref_model, **attributes):
    """The attributes TRL's trainers read in their loss code; the rest of `self` does not exist."""
    return types.SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=fake_accelerator(), aux_loss_enabled=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=attributes.pop("discopop_tau", 0.05)),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        **attributes)


# ----------------------------------------------------------------------------
# One adapter per entry point.

@dataclass(frozen=True)
class Result:
    loss: float
    metrics: dict


def trl_dpo(batch: Batch, loss_type, loss_weights=None, *, beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
            ld_alpha=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
            use_weighting=False) -> Result:
    """TRL's DPOTrainer._compute_loss, through both of its reference paths: reference log-probs precomputed by
    TRL's own compute_ref_log_probs and passed in the batch, and a live reference model. They must agree."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    ids = batch.inputs["input_ids"]
    policy = FakeLM((ids, batch.policy, batch.log_sum_sq))
    reference = FakeLM((ids, batch.reference, None))
    results = []
    for precompute in (True, False):
        self = fake_trainer(
            policy, None if precompute else reference, precompute_ref_logps=precompute, beta=beta,
            loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types),
            label_smoothing=label_smoothing, discopop_tau=discopop_tau, ld_alpha=ld_alpha,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
            use_weighting=use_weighting)
        inputs = dict(batch.inputs)
        if precompute:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = DPOTrainer.compute_ref_log_probs(
                self, reference, inputs)
        loss = DPOTrainer._compute_loss(self, policy, inputs, False)
        results.append(Result(loss.item(), {k: v[-1] for k, v in self._metrics["train"].items()}))
    precomputed, live = results
    assert live.loss == pytest.approx(precomputed.loss, abs=1e-12)
    return live


def ours_pairs(batch: Batch, cfg, desirable=None) -> Result:
    """Ours on the same per-token values, as the trainer hands them to the loss: the pairs, or the chosen
    responses alone when the spec learns from those (loss=sft, and a sum whose only term is sft)."""
    spec = build_loss(cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg))
    if spec.data == "chosen":
        out = spec(sequence_stats(*batch.chosen_only(batch.policy)))
        return Result(out.loss.item(), {k: v.item() for k, v in out.metrics.items()})
    tokens, seq, n = flat(batch.policy, batch.mask)
    ref_tokens, _, _ = flat(batch.reference, batch.mask)
    lss = flat(batch.log_sum_sq, batch.mask)[0] if spec.use_weighting else None
    policy = sequence_stats(tokens, seq, n, ld_alpha=spec.ld_alpha, log_sum_sq=lss)
    reference = sequence_stats(ref_tokens, seq, n, ld_alpha=spec.ld_alpha).scored
    out = spec(policy, reference, desirable)
    return Result(out.loss.item(), {k: v.item() for k, v in out.metrics.items()})


def ours_name(trl_name: str) -> str:
    return OURS.get(trl_name, trl_name)


def ours_single(trl_name: str, **cfg) -> dict:
    """Our config for TRL's single loss_type (sft as a pair-loss term: ours loss=sft is the chosen-only path)."""
    if trl_name == "sft":
        return {"name": "sum", "terms": ["sft"], **cfg}
    return {"name": ours_name(trl_name), **cfg}


def hydra_node(name: str, **overrides):
    """The node `loss=<name>` composes to (register_configs), with overrides."""
    from hydra.core.config_store import ConfigStore

    register_configs()
    return OmegaConf.merge(ConfigStore.instance().load(f"loss/{name}.yaml").node, overrides)


# ----------------------------------------------------------------------------
# 1. Every DPOConfig.loss_type.

LOSS_TYPE_CASES = [
    ("sigmoid", {}), ("hinge", {}), ("ipo", {}),
    ("exo_pair", {"label_smoothing": 1e-3}), ("exo_pair", {"label_smoothing": 0.2}),
    ("nca_pair", {}), ("robust", {"label_smoothing": 0.0}), ("robust", {"label_smoothing": 0.1}),
    ("bco_pair", {}), ("sppo_hard", {}),
    ("aot", {}), ("aot", {"label_smoothing": 0.1}), ("aot_unpaired", {}), ("aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", {}), ("apo_down", {}),
    ("discopop", {}), ("discopop", {"discopop_tau": 0.2}),
    ("sft", {}), ("sigmoid_norm", {}),
]


def test_every_trl_loss_type_is_covered():
    assert sorted({t for t, _ in LOSS_TYPE_CASES}) == sorted(TRL_LOSS_TYPES)
    assert {e.trl for e in LOSSES.values()} >= set(TRL_LOSS_TYPES) - {"sft"}


def test_fake_models_are_plain_models():
    model = FakeLM()
    assert not is_peft_model(model)
    with _dpo_module.disable_gradient_checkpointing(model, None):
        pass


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("loss_type,params", LOSS_TYPE_CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_loss_type_matches_trl(loss_type, params, beta):
    theirs = trl_dpo(BATCH, loss_type, beta=beta, **params)
    ours = ours_pairs(BATCH, ours_single(loss_type, beta=beta, **params))
    assert ours.loss == pytest.approx(theirs.loss, abs=TOL)
    if loss_type != "sft":   # ours logs no rewards for an sft-only sum (its beta is unused)
        for key in REWARD_METRICS:
            assert ours.metrics[key] == pytest.approx(theirs.metrics[key], abs=TOL), key


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_sigmoid_is_our_dpo(beta):
    assert build_loss(OmegaConf.create({"name": "sigmoid"})).terms[0].name == "dpo"
    theirs = trl_dpo(BATCH, "sigmoid", beta=beta).loss
    assert ours_pairs(BATCH, {"name": "sigmoid", "beta": beta}).loss == pytest.approx(theirs, abs=TOL)
    assert ours_pairs(BATCH, {"name": "dpo", "beta": beta}).loss == pytest.approx(theirs, abs=TOL)


def test_standalone_sft_on_chosen_only_matches_trl_sft():
    """loss=sft trains chosen-only data: SeqLogps of the B chosen responses alone."""
    spec = build_loss(OmegaConf.create({"name": "sft"}))
    assert spec.data == "chosen"
    out = spec(sequence_stats(*BATCH.chosen_only(BATCH.policy)))
    assert out.loss.item() == pytest.approx(trl_dpo(BATCH, "sft").loss, abs=TOL)


# ----------------------------------------------------------------------------
# 2. IPO: per-token average (TRL's, ours by default) and the summed form.

@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_ipo_token_average_matches_trl_and_summed_matches_hand_formula(beta):
    theirs = trl_dpo(BATCH, "ipo", beta=beta).loss
    assert ours_pairs(BATCH, {"name": "ipo", "beta": beta}).loss == pytest.approx(theirs, abs=TOL)
    assert ours_pairs(BATCH, {"name": "ipo", "beta": beta, "token_average": True}).loss == pytest.approx(theirs, abs=TOL)

    pi, ref = BATCH.policy.sum(1).tolist(), BATCH.reference.sum(1).tolist()
    h = [(pi[i] - pi[B + i]) - (ref[i] - ref[B + i]) for i in range(B)]
    summed = sum((x - 1 / (2 * beta)) ** 2 for x in h) / B
    ours_summed = ours_pairs(BATCH, {"name": "ipo", "beta": beta, "token_average": False}).loss
    assert ours_summed == pytest.approx(summed, abs=TOL)
    # The two forms are different losses: on these inputs summed - averaged is 26.5454 - 26.1151 = 0.430 at
    # beta=0.1 and 1.3740 - 0.7020 = 0.672 at beta=0.7.
    assert abs(ours_summed - theirs) > 0.1


# ----------------------------------------------------------------------------
# 3. Modifiers.

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_alpha_matches_trl(loss_type, ld_alpha):
    theirs = trl_dpo(BATCH, loss_type, beta=0.3, ld_alpha=ld_alpha)
    ours = ours_pairs(BATCH, ours_single(loss_type, beta=0.3, ld_alpha=ld_alpha))
    assert ours.loss == pytest.approx(theirs.loss, abs=TOL)
    for key in REWARD_METRICS:    # LD-weighted on both sides (logps/* included)
        assert ours.metrics[key] == pytest.approx(theirs.metrics[key], abs=TOL), key
    plain = ours_pairs(BATCH, ours_single(loss_type, beta=0.3)).loss
    if ld_alpha == 1.0:
        assert ours.loss == pytest.approx(plain, abs=1e-12)
    else:   # the fixture has pairs of unequal lengths, so the tails matter
        assert abs(ours.loss - plain) > 1e-3


F_DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.3)]


@pytest.mark.parametrize("kind,coef", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", sorted(TRL_F_DIVERGENCE))
def test_f_divergence_matches_trl(loss_type, kind, coef):
    params = {"beta": 0.3, "label_smoothing": 0.1 if loss_type in ("exo_pair", "robust") else 0.0,
              "f_divergence_type": kind, "f_alpha_divergence_coef": coef}
    batch, tol = (BATCH32, {"rel": 1e-5, "abs": 1e-5}) if kind == "alpha_divergence" else (BATCH, {"abs": TOL})
    theirs = trl_dpo(batch, loss_type, **params).loss
    assert math.isfinite(theirs)
    assert ours_pairs(batch, ours_single(loss_type, **params)).loss == pytest.approx(theirs, **tol)
    if loss_type != "sft":   # the divergence changes the loss (least: sigmoid_norm with forward_kl, by 7e-6)
        reverse = trl_dpo(batch, loss_type, **{**params, "f_divergence_type": "reverse_kl"}).loss
        assert abs(reverse - theirs) > 1e-6


@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair", "ipo"])
def test_wpo_weighting_matches_trl(loss_type):
    theirs = trl_dpo(BATCH, loss_type, beta=0.3, use_weighting=True).loss
    ours = ours_pairs(BATCH, ours_single(loss_type, beta=0.3, use_weighting=True)).loss
    assert ours == pytest.approx(theirs, abs=TOL)
    assert abs(ours - ours_pairs(BATCH, ours_single(loss_type, beta=0.3)).loss) > 1e-3


# (TRL loss_type, loss_weights, modifiers, our config)
COMBOS = [
    (["sigmoid", "sft"], [1.0, 1.0], {}, "rpo"),
    (["sigmoid", "sft"], [1.0, 1.0], {}, {"name": "sum", "terms": ["dpo", "sft"]}),
    (["sigmoid", "sft"], [1.0, 1.0], {}, {"name": "sum", "terms": ["sigmoid", "sft"], "weights": [1.0, 1.0]}),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}, "mpo"),
    (["sigmoid", "bco_pair"], [1.0, 0.5], {"use_weighting": True, "ld_alpha": 0.5},
     {"name": "sum", "terms": ["dpo", "bco_pair"], "weights": [1.0, 0.5]}),
    (["ipo", "bco_pair"], [0.3, 1.0], {"use_weighting": True, "ld_alpha": 0.0},
     {"name": "sum", "terms": ["ipo", "bco_pair"], "weights": [0.3, 1.0]}),
    (["hinge", "sft"], [2.0, 1.0], {"f_divergence_type": "js_divergence"},
     {"name": "sum", "terms": ["hinge", "sft"], "weights": [2.0, 1.0]}),
]


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("loss_types,weights,modifiers,cfg", COMBOS,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_weighted_sum_matches_trl(loss_types, weights, modifiers, cfg, beta):
    if isinstance(cfg, str):   # a preset: the node `loss=rpo` / `loss=mpo` composes to
        cfg = hydra_node(cfg, beta=beta, **modifiers)
    else:
        cfg = {**cfg, "beta": beta, **modifiers}
    theirs = trl_dpo(BATCH, loss_types, weights, beta=beta, **modifiers)
    ours = ours_pairs(BATCH, cfg)
    assert ours.loss == pytest.approx(theirs.loss, abs=TOL)
    # each term's logged value is that term computed alone, with the same modifiers (ours and TRL's)
    for name in loss_types:
        alone = ours_pairs(BATCH, ours_single(name, beta=beta, **modifiers)).loss
        assert ours.metrics[f"loss/{ours_name(name)}"] == pytest.approx(alone, abs=TOL)
        assert alone == pytest.approx(trl_dpo(BATCH, name, beta=beta, **modifiers).loss, abs=TOL)


def test_rpo_with_wpo_weights_its_nll_term_too():
    """TRL 1.16 cannot run loss_type sft with use_weighting (`per_sequence_loss *= ...` on the expanded sft
    loss: RuntimeError), so RPO + WPO is TRL's sigmoid + WPO plus the NLL weighted by the same pair weights."""
    wpo = ((BATCH.policy - BATCH.log_sum_sq) * BATCH.mask).sum(1) / BATCH.mask.sum(1)
    weights = torch.exp(wpo[:B]) * torch.exp(wpo[B:])
    nll_term = (chosen_nll(BATCH) * weights).mean().item()
    expected = trl_dpo(BATCH, "sigmoid", beta=0.3, use_weighting=True).loss + nll_term
    ours = ours_pairs(BATCH, {"name": "sum", "terms": ["dpo", "sft"], "beta": 0.3, "use_weighting": True})
    assert ours.loss == pytest.approx(expected, abs=TOL)
    assert ours.metrics["loss/sft"] == pytest.approx(nll_term, abs=TOL)


def test_sum_of_sft_alone_keeps_its_weight():
    theirs = trl_dpo(BATCH, ["sft"], [0.5]).loss
    assert ours_pairs(BATCH, {"name": "sum", "terms": ["sft"], "weights": [0.5]}).loss == pytest.approx(theirs, abs=TOL)


@pytest.mark.parametrize("preset", ["rpo", "mpo"])
def test_bare_preset_builds_its_terms(preset):
    spec = build_loss(OmegaConf.create({"name": preset}))
    assert [t.name for t in spec.terms] == hydra_node(preset).terms


# ----------------------------------------------------------------------------
# 4. Settings TRL refuses (DPOTrainer.__init__ raises ValueError / NotImplementedError), refused as ConfigError.

@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_allowed_exactly_where_trl_allows_it(loss_type, kind):
    cfg = OmegaConf.create({**ours_single(loss_type), "f_divergence_type": kind, "label_smoothing": 0.1})
    if loss_type in TRL_F_DIVERGENCE:
        build_loss(cfg)
    else:
        with pytest.raises(ConfigError, match=f"f_divergence_type={kind} does not apply to loss {loss_type}"):
            build_loss(cfg)


@pytest.mark.parametrize("cfg,match", [
    ({"name": "nca_pair", "f_divergence_type": "js_divergence"}, "does not apply to loss nca_pair"),
    ({"name": "bco_pair", "f_divergence_type": "forward_kl"}, "does not apply to loss bco_pair"),
    ({"name": "aot", "f_divergence_type": "alpha_divergence"}, "does not apply to loss aot"),
    ({"name": "apo_zero", "f_divergence_type": "js_divergence"}, "does not apply to loss apo_zero"),
    ({"name": "sum", "terms": ["dpo", "bco_pair"], "f_divergence_type": "js_divergence"},
     "does not apply to loss bco_pair"),
    ({"name": "aot", "use_weighting": True}, "use_weighting=true cannot weight loss=aot"),
    ({"name": "aot_unpaired", "use_weighting": True}, "use_weighting=true cannot weight loss=aot_unpaired"),
    ({"name": "sum", "terms": ["dpo", "aot"], "use_weighting": True}, "use_weighting=true cannot weight"),
    ({"name": "exo_pair", "label_smoothing": 0.0}, "exo_pair needs loss.label_smoothing > 0"),
])
def test_refusals_trl_also_makes(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_loss(OmegaConf.create(cfg))


# ----------------------------------------------------------------------------
# 5. The reference-free family: TRL's experimental CPO and ORPO trainers' loss functions.

def chosen_nll(batch: Batch) -> torch.Tensor:
    """TRL's NLL term (CrossEntropyLoss's mean over the chosen responses' tokens)."""
    return -batch.policy[:B].sum() / batch.mask[:B].sum()


def averages(batch: Batch):
    avg = batch.policy.sum(1) / batch.mask.sum(1)
    return avg[:B], avg[B:]


@pytest.mark.parametrize("beta,cpo_alpha,label_smoothing", [(0.1, 1.0, 0.0), (0.5, 0.3, 0.1), (0.2, 0.0, 0.0)])
def test_cpo_matches_trl(beta, cpo_alpha, label_smoothing):
    self = types.SimpleNamespace(beta=beta, label_smoothing=label_smoothing, loss_type="sigmoid", simpo_gamma=0.5,
                                 alpha=0.0, accelerator=fake_accelerator())
    sums = BATCH.policy.sum(1)   # TRL's CPO passes summed log-probs for loss_type=sigmoid
    losses, _, _ = CPOTrainer.cpo_loss(self, sums[:B], sums[B:])
    theirs = (losses.mean() + cpo_alpha * chosen_nll(BATCH)).item()
    ours = ours_pairs(BATCH, {"name": "cpo", "beta": beta, "cpo_alpha": cpo_alpha, "label_smoothing": label_smoothing})
    assert ours.loss == pytest.approx(theirs, abs=TOL)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.0), (2.0, 1.6, 0.1)])
def test_simpo_matches_trl(beta, gamma, label_smoothing):
    self = types.SimpleNamespace(beta=beta, label_smoothing=label_smoothing, loss_type="simpo", simpo_gamma=gamma,
                                 alpha=0.0, accelerator=fake_accelerator())
    losses, _, _ = CPOTrainer.cpo_loss(self, *averages(BATCH))   # per-token averages for simpo; cpo_alpha=0
    ours = ours_pairs(BATCH, {"name": "simpo", "beta": beta, "simpo_gamma": gamma, "label_smoothing": label_smoothing})
    assert ours.loss == pytest.approx(losses.mean().item(), abs=TOL)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    self = types.SimpleNamespace(beta=beta, accelerator=fake_accelerator())
    losses, *_ = ORPOTrainer.odds_ratio_loss(self, *averages(BATCH))
    theirs = (chosen_nll(BATCH) - losses.mean()).item()   # ORPOTrainer: policy_nll_loss - losses.mean()
    assert ours_pairs(BATCH, {"name": "orpo", "beta": beta}).loss == pytest.approx(theirs, abs=TOL)


# One pair by hand: chosen tokens -0.5, -1.0, -1.5 (sum -3, mean -1); rejected -2.5, -2.0 (sum -4.5, mean -2.25).
HAND_W, HAND_L = [-0.5, -1.0, -1.5], [-2.5, -2.0]


def ours_one_pair(cfg) -> float:
    tokens = torch.tensor(HAND_W + HAND_L, dtype=torch.float64)
    seq = torch.tensor([0] * len(HAND_W) + [1] * len(HAND_L))
    policy = sequence_stats(tokens, seq, torch.tensor([len(HAND_W), len(HAND_L)]))
    return build_loss(OmegaConf.create(cfg))(policy).loss.item()


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_simpo_by_hand():
    # SimPO Eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)
    beta, gamma = 2.0, 0.5
    expected = -log_sigmoid(beta * sum(HAND_W) / 3 - beta * sum(HAND_L) / 2 - gamma)   # = -log sigmoid(2)
    assert expected == pytest.approx(math.log1p(math.exp(-2.0)))
    assert ours_one_pair({"name": "simpo", "beta": beta, "simpo_gamma": gamma}) == pytest.approx(expected, abs=1e-12)


def test_cpo_by_hand():
    # CPO: -log sigmoid(beta (log pi(y_w) - log pi(y_l))) + alpha * NLL(y_w), NLL per token
    beta, alpha = 0.1, 1.0
    nll = -sum(HAND_W) / len(HAND_W)   # 1.0
    expected = -log_sigmoid(beta * (sum(HAND_W) - sum(HAND_L))) + alpha * nll
    assert ours_one_pair({"name": "cpo", "beta": beta, "cpo_alpha": alpha}) == pytest.approx(expected, abs=1e-12)


def test_orpo_by_hand():
    # ORPO: NLL - lambda log sigmoid(log(odds(y_w) / odds(y_l))), odds = P / (1 - P), P = exp(mean token log-prob)
    lam = 0.1
    p_w, p_l = math.exp(sum(HAND_W) / 3), math.exp(sum(HAND_L) / 2)
    odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    expected = -sum(HAND_W) / 3 - lam * math.log(odds_ratio / (1 + odds_ratio))   # log sigmoid(log r) = log r/(1+r)
    assert ours_one_pair({"name": "orpo", "beta": lam}) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------
# 6. KTO: unpaired rows, each with the KL completion of the previous row.

DESIRABLE = torch.tensor([True, False, True, False])


@dataclass(frozen=True)
class KtoBatch:
    inputs: dict                # TRL's DataCollatorForUnpairedPreference output
    mask: torch.Tensor          # completion_mask[:, 1:]
    kl_mask: torch.Tensor       # KL_completion_mask[:, 1:]
    policy: torch.Tensor
    reference: torch.Tensor
    policy_kl: torch.Tensor
    reference_kl: torch.Tensor


def make_kto_batch(kl_shift: float, seed: int = 1) -> KtoBatch:
    """The KL completions' log-ratio is kl_shift per token (+- 0.1): its batch mean has kl_shift's sign."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, 100, (n,), generator=g).tolist()

    completions = [ids(n) for n in CHOSEN_LENS]
    examples = [{"prompt_ids": ids(p), "completion_ids": c, "KL_completion_ids": completions[i - 1],
                 "label": bool(DESIRABLE[i])} for i, (p, c) in enumerate(zip(PROMPT_LENS, completions))]
    inputs = _kto_module.DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    mask, kl_mask = inputs["completion_mask"][:, 1:].bool(), inputs["KL_completion_mask"][:, 1:].bool()
    policy = random_logps(g, mask, torch.float64)
    policy_kl = random_logps(g, kl_mask, torch.float64, low=0.5)
    noise = 0.1 * (2 * torch.rand(kl_mask.shape, generator=g, dtype=torch.float64) - 1)
    reference_kl = torch.where(kl_mask, policy_kl - kl_shift + noise, 0)
    return KtoBatch(inputs, mask, kl_mask, policy, near(g, policy, mask, 1.0), policy_kl, reference_kl)


def trl_kto(batch: KtoBatch, *, beta, desirable_weight=1.0, undesirable_weight=1.0) -> Result:
    """TRL's KTOTrainer._compute_loss with its own _compute_kl_logps, through both reference paths."""
    ids, kl_ids = batch.inputs["input_ids"], batch.inputs["KL_input_ids"]
    policy = FakeLM((ids, batch.policy, None), (kl_ids, batch.policy_kl, None))
    reference = FakeLM((ids, batch.reference, None), (kl_ids, batch.reference_kl, None))
    results = []
    for precompute in (True, False):
        self = fake_trainer(policy, None if precompute else reference, precompute_ref_logps=precompute,
                            calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
                            undesirable_weight=undesirable_weight)
        self._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, self)
        inputs = dict(batch.inputs)
        if precompute:
            inputs["ref_logps"], inputs["ref_KL_logps"] = KTOTrainer.compute_ref_log_probs(self, reference, inputs)
        loss = KTOTrainer._compute_loss(self, policy, inputs, False)
        results.append(Result(loss.item(), {k: v[-1] for k, v in self._metrics["train"].items()}))
    precomputed, live = results
    assert live.loss == pytest.approx(precomputed.loss, abs=1e-12)
    return live


def ours_kto(batch: KtoBatch, cfg) -> Result:
    """Sequences 0..B-1: each row's completion; B..2B-1: its KL completion."""
    main, kl = flat(batch.policy, batch.mask), flat(batch.policy_kl, batch.kl_mask, first_seq=B)
    tokens, seq, n = (torch.cat(parts) for parts in zip(main, kl))
    ref_tokens = torch.cat([batch.reference[batch.mask], batch.reference_kl[batch.kl_mask]])
    spec = build_loss(OmegaConf.create({"name": "kto", **cfg}))
    out = spec(sequence_stats(tokens, seq, n), sequence_stats(ref_tokens, seq, n).sums, DESIRABLE)
    return Result(out.loss.item(), {k: v.item() for k, v in out.metrics.items()})


@pytest.mark.parametrize("kl_shift", [0.2, -0.2], ids=["kl>0", "kl<0-clamped"])
@pytest.mark.parametrize("beta,desirable_weight,undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.75)])
def test_kto_matches_trl(kl_shift, beta, desirable_weight, undesirable_weight):
    batch = make_kto_batch(kl_shift)
    kl_mean = ((batch.policy_kl - batch.reference_kl).sum(1)).mean().item()
    assert (kl_mean > 0) == (kl_shift > 0)
    cfg = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    theirs = trl_kto(batch, **cfg)
    ours = ours_kto(batch, cfg)
    assert ours.loss == pytest.approx(theirs.loss, abs=TOL)
    assert ours.metrics["kl"] == pytest.approx(max(kl_mean, 0.0), abs=1e-12)
    for key in ("kl", "rewards/chosen", "rewards/rejected"):
        assert ours.metrics[key] == pytest.approx(theirs.metrics[key], abs=TOL), key


@pytest.mark.parametrize("ref_kl,kl_sign", [((-1.5, -0.5, -1.0), -1), ((-1.9, -0.9, -1.4), 1)],
                         ids=["kl<0-clamped", "kl>0"])
def test_kto_by_hand(ref_kl, kl_sign):
    """KTO Eq. 7 for 2 rows, row 0 desirable, row 1 not: z = max(0, mean of the KL completions' log-ratios),
    loss = mean(lambda_D (1 - sigmoid(beta (r_0 - z))), lambda_U (1 - sigmoid(beta (z - r_1))))."""
    beta, lam_d, lam_u = 0.5, 1.2, 0.8
    # row 0: its completion (2 tokens) and its KL completion (row 1's completion, 1 token); row 1 the reverse
    pol = {"r0": [-0.5, -1.2], "r1": [-2.0], "kl0": [-1.7], "kl1": [-0.8, -1.1]}
    ref = {"r0": [-0.9, -1.0], "r1": [-1.5], "kl0": [ref_kl[0]], "kl1": list(ref_kl[1:])}
    r0 = sum(pol["r0"]) - sum(ref["r0"])
    r1 = sum(pol["r1"]) - sum(ref["r1"])
    kl_mean = ((sum(pol["kl0"]) - sum(ref["kl0"])) + (sum(pol["kl1"]) - sum(ref["kl1"]))) / 2
    z = max(0.0, kl_mean)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = (lam_d * (1 - sigmoid(beta * (r0 - z))) + lam_u * (1 - sigmoid(beta * (z - r1)))) / 2

    order = ["r0", "r1", "kl0", "kl1"]
    seq = torch.tensor([i for i, k in enumerate(order) for _ in pol[k]])
    n = torch.tensor([len(pol[k]) for k in order])
    policy = sequence_stats(torch.tensor([x for k in order for x in pol[k]], dtype=torch.float64), seq, n)
    reference = sequence_stats(torch.tensor([x for k in order for x in ref[k]], dtype=torch.float64), seq, n).sums
    spec = build_loss(OmegaConf.create({"name": "kto", "beta": beta, "desirable_weight": lam_d,
                                        "undesirable_weight": lam_u}))
    out = spec(policy, reference, torch.tensor([True, False]))
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(z, abs=1e-12)
    assert kl_mean == pytest.approx(0.3 * kl_sign)   # (-0.2 - 0.4) / 2 or (0.2 + 0.4) / 2
