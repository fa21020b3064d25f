"""The DPO family inside the trainer: what the loss registry promises about
models, memory, logging and resume (the formulas themselves are checked in
test_losses.py by hand and in test_losses_vs_trl.py against TRL's code)."""
from collections import defaultdict

import pytest
import torch

from utils import ConfigError


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_tr_dpo_mixes_the_reference_every_sync_steps(micro_trainer):
    """TR-DPO: after steps 1..k the reference is the starting model until
    step k = ref_model_sync_steps, then alpha * policy + (1 - alpha) * ref."""
    t = micro_trainer("loss=dpo", "loss.sync_ref_model=true", "loss.ref_model_sync_steps=2",
                      "loss.ref_model_mixup_alpha=0.6", "optimizer=SGD", "lr=0.5")
    start = params(t.reference)
    window = defaultdict(list)
    t.train_step(window)
    assert all(torch.equal(a, b) for a, b in zip(params(t.reference), start))   # step 1: not yet
    t.train_step(window)
    policy = params(t.policy)
    assert any(not torch.equal(p, s) for p, s in zip(policy, start)), "the policy did not move"
    for ref, p, s in zip(params(t.reference), policy, start):
        torch.testing.assert_close(ref, 0.6 * p + 0.4 * s, rtol=0, atol=1e-6)


def test_reference_free_losses_build_no_reference(micro_trainer):
    """SimPO/CPO/ORPO (and reference_free=true) build no reference model: the
    memory metrics show it, and the planner leaves it out."""
    from prefopt.memory import plan

    for loss, reference in (("dpo", True), ("simpo", False), ("cpo", False), ("orpo", False)):
        t = micro_trainer(f"loss={loss}")
        assert (t.reference is not None) == reference
        t.train_step(defaultdict(list))
        memory = t.memory_metrics()
        assert memory["memory/reference_params_bytes"] == (memory["memory/params_bytes"] if reference else 0)
        assert (plan(t.cfg)["reference_params_bytes"] > 0) == reference


def test_weighted_sum_logs_each_term(micro_trainer):
    """loss=mpo = 0.8 dpo + 0.2 bco_pair + 1.0 sft: the logged total is the
    weighted sum of the logged terms."""
    t = micro_trainer("loss=mpo")
    batch = t.collate(t.eval_examples[:4])
    with torch.no_grad():
        loss, metrics = t.batch_metrics(batch, "eval")
    terms = {k.rsplit("/", 1)[1]: v.item() for k, v in metrics.items() if k.startswith("loss/eval/")}
    assert set(terms) == {"dpo", "bco_pair", "sft"}
    assert loss.item() == pytest.approx(0.8 * terms["dpo"] + 0.2 * terms["bco_pair"] + terms["sft"], abs=1e-6)


def test_alias_records_the_canonical_name(micro_trainer):
    t = micro_trainer("loss=sigmoid")
    assert t.cfg.loss.name == "dpo" and t.loss.name == "dpo"


@pytest.mark.parametrize("overrides, message", [
    (["loss=nca_pair", "loss.f_divergence_type=js_divergence"], "does not apply to loss nca_pair"),
    (["loss=aot", "loss.use_weighting=true"], "sorts the batch"),
    (["loss=exo_pair", "loss.label_smoothing=0"], "needs loss.label_smoothing > 0"),
    (["loss=dpo", "loss.sync_ref_model=true", "loss.precompute_reference=true"], "cannot be precomputed"),
    (["loss=sum"], "needs loss.terms"),
    (["loss=sum", "loss.terms=[dpo,kto]"], "kto cannot be a term"),
    (["loss=sum", "loss.terms=[dpo,sft]", "loss.weights=[1.0]"], "1 values for 2 loss.terms"),
    (["loss=dpo", "loss.ld_alpha=2"], "loss.ld_alpha=2.0 must be null or in [0, 1]"),
    (["loss=dpo", "loss.f_divergence_type=kl"], "must be one of reverse_kl"),
    (["loss=dpo", "loss.ld_alpha=abc"], "loss.ld_alpha='abc' should be a number"),
    (["loss=kto", "batch_size=8", "gradient_accumulation_steps=8"], "needs at least 2 rows per micro-batch"),
    (["loss=kto", "data.unpaired=false"], "data.unpaired=false; set data.unpaired=auto"),
    (["loss=dpo", "data.unpaired=true"], "data.unpaired=true only applies"),
])
def test_bad_loss_settings_are_one_line_errors(micro_trainer, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")) as e:
        micro_trainer(*overrides)
    assert "\n" not in str(e.value)


def test_kto_batch_rotates_completions_for_the_kl_term(micro_trainer):
    """loss=kto on the bundled pairs: they are split into desirable/undesirable
    rows; in a batch, row i's second sequence is its prompt with row i-1's
    completion (TRL's rotation), and the loss is the KTO paper's Eq. 7 on
    those log-probs, written out here."""
    t = micro_trainer("loss=kto", "share_prompt=false", "loss.desirable_weight=1.5")
    rows = t.train_stream.examples
    assert {r.label for r in rows} == {True, False} and all(r.rejected is None for r in rows)
    batch_rows = rows[:4]
    batch = t.collate(batch_rows)
    assert batch["desirable"].tolist() == [r.label for r in batch_rows]
    pad = t.tokenizer.pad_token_id
    ids = [[tok for tok in row if tok != pad] for row in batch["input_ids"].tolist()]
    for i, r in enumerate(batch_rows):
        assert ids[i] == r.prompt + r.chosen
        assert ids[4 + i] == r.prompt + batch_rows[i - 1].chosen
    with torch.no_grad():
        loss, metrics = t.batch_metrics(batch, "eval")
        pi = t.forward_logps(t.policy, batch).sums
        ref = t.forward_logps(t.reference, batch).sums
    ratio, kl_ratio = (pi - ref)[:4], (pi - ref)[4:]
    z = max(0.0, kl_ratio.mean().item())
    beta = 0.1
    expected = [1.5 * (1 - torch.sigmoid(torch.tensor(beta * (ratio[i].item() - z)))).item() if r.label
                else 1 - torch.sigmoid(torch.tensor(beta * (z - ratio[i].item()))).item()
                for i, r in enumerate(batch_rows)]
    assert loss.item() == pytest.approx(sum(expected) / 4, abs=1e-6)
    assert metrics["kl/eval"].item() == pytest.approx(z, abs=1e-6)


def test_readme_loss_table_is_the_registry():
    """README.md's loss table is `python -m prefopt.losses`, current."""
    from conftest import ROOT

    from prefopt.losses import loss_table

    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- loss table: python -m prefopt.losses -->\n") + len(
        "<!-- loss table: python -m prefopt.losses -->\n")
    assert readme[start:readme.index("\n<!-- end of loss table -->")] == loss_table()
