"""The loss family against numbers worked out by hand."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.losses import SeqLogps, build_loss, sequence_logps, sft_loss

# One pair: log pi(w)=-1, log pi(l)=-3, log ref(w)=-2, log ref(l)=-2.5, beta=0.5.
# h = (-1 - -3) - (-2 - -2.5) = 2 - 0.5 = 1.5 ; beta*h = 0.75
PI_W, PI_L, REF_W, REF_L, BETA = -1.0, -3.0, -2.0, -2.5, 0.5


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x), written independently of torch
    return math.log(1.0 + math.exp(x))


def preference_loss(pi_w, pi_l, ref_w, ref_l, beta, kind, **kw):
    """(loss, chosen reward, rejected reward) of one pair through the configured loss."""
    spec = build_loss(OmegaConf.create({"name": kind, "beta": beta, **kw}))
    tokens = torch.tensor([5, 5])
    out = spec(SeqLogps(torch.cat([pi_w, pi_l]), tokens), torch.cat([ref_w, ref_l]))
    return out.loss, out.metrics["rewards/chosen"], out.metrics["rewards/rejected"]


def run(kind, **kw):
    def t(x):
        return torch.tensor([x], dtype=torch.float64)
    losses, cw, cl = preference_loss(t(PI_W), t(PI_L), t(REF_W), t(REF_L), BETA, kind, **kw)
    return losses.item(), cw.item(), cl.item()


def test_dpo_matches_hand_computation():
    loss, chosen_reward, rejected_reward = run("dpo")
    assert loss == pytest.approx(softplus(-0.75), abs=1e-12)
    assert loss == pytest.approx(0.3868710, abs=1e-6)      # log(1 + e^-0.75)
    assert chosen_reward == pytest.approx(0.5 * (-1.0 - -2.0))     # 0.5
    assert rejected_reward == pytest.approx(0.5 * (-3.0 - -2.5))   # -0.25


def test_conservative_dpo_label_smoothing():
    loss, _, _ = run("dpo", label_smoothing=0.1)
    assert loss == pytest.approx(0.9 * softplus(-0.75) + 0.1 * softplus(0.75), abs=1e-12)
    assert loss == pytest.approx(0.4618710, abs=1e-6)


def test_ipo_summed():
    loss, _, _ = run("ipo", token_average=False)
    assert loss == pytest.approx((1.5 - 1 / (2 * 0.5)) ** 2)   # (1.5 - 1)^2 = 0.25
    assert loss == pytest.approx(0.25)


def test_hinge():
    loss, _, _ = run("hinge")
    assert loss == pytest.approx(0.25)                          # max(0, 1 - 0.75)


def test_reference_free_ignores_reference():
    loss, _, _ = run("dpo", reference_free=True)
    assert loss == pytest.approx(softplus(-0.5 * 2.0))          # h = 2
    assert loss == pytest.approx(0.3132617, abs=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    w = torch.tensor([-1.0], requires_grad=True)
    l = torch.tensor([-3.0], requires_grad=True)
    loss, _, _ = preference_loss(w, l, torch.tensor([REF_W]), torch.tensor([REF_L]), BETA, "dpo")
    loss.sum().backward()
    # d/dw [-log sigmoid(beta h)] = -beta * sigmoid(-beta h)
    expected = -0.5 * (1 / (1 + math.exp(0.75)))
    assert w.grad.item() == pytest.approx(expected, abs=1e-7)
    assert l.grad.item() == pytest.approx(-expected, abs=1e-7)


def test_sequence_logps_by_hand():
    # vocab 3, one sequence of 3 tokens [0, 2, 1]; labels mask the first token (prompt)
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 1.0]]])
    labels = torch.tensor([[-100, 2, 1]])
    logp, n = sequence_logps(logits, labels)
    # position 0 predicts token 2: log(e^3 / (e^1+e^2+e^3)); position 1 predicts token 1: log(1/3)
    expected = (3 - math.log(math.e + math.e ** 2 + math.e ** 3)) + math.log(1 / 3)
    assert logp.item() == pytest.approx(expected, abs=1e-6)
    assert n.item() == 2


def test_sft_loss_is_token_mean_nll():
    logps = torch.tensor([-4.0, -2.0])
    tokens = torch.tensor([4, 1])
    assert sft_loss(logps, tokens).item() == pytest.approx(6.0 / 5.0)
