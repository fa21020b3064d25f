"""The trainer in-process: concatenated forward, reference model, metrics
contract, checkpoints, and every config option composing and building."""
from collections import defaultdict

import pytest
import torch
from conftest import ROOT, compose, read_metrics

from preference_datasets import collate
from utils import ConfigError


@pytest.mark.parametrize("share_prompt", [False, True])
def test_batched_logps_equal_one_sequence_at_a_time(micro_trainer, share_prompt):
    """Both batch layouts (2B padded rows, or B rows of prompt + chosen +
    rejected with a 4-D mask) give each response the log-prob it gets when
    its prompt + response is run alone, unpadded, through the plain model."""
    t = micro_trainer()
    t.policy.eval()
    examples = t.eval_examples[:6]
    assert len({len(ex.prompt) for ex in examples}) > 1 and len({len(ex.chosen) for ex in examples}) > 1  # padding
    batch = collate(examples, t.tokenizer.pad_token_id, with_rejected=True, share_prompt=share_prompt)
    assert batch["input_ids"].shape[0] == (6 if share_prompt else 12)
    with torch.no_grad():
        out = t.forward_logps(t.policy, batch)
        together, n_scored = out.sums, out.tokens
        alone = []
        for seq_prompt, resp in [(ex.prompt, ex.chosen) for ex in examples] + [(ex.prompt, ex.rejected) for ex in examples]:
            ids = torch.tensor([seq_prompt + resp])
            out = torch.log_softmax(t.policy(input_ids=ids).logits[0].double(), -1)
            # sum of log p(token_t | <t) over the response tokens only, written out directly
            alone.append(sum(out[len(seq_prompt) + j - 1, tok].item() for j, tok in enumerate(resp)))
    assert together.tolist() == pytest.approx(alone, abs=1e-4)
    assert n_scored.tolist() == [len(ex.chosen) for ex in examples] + [len(ex.rejected) for ex in examples]
    assert batch["lengths"].tolist() == [len(ex.prompt) + len(ex.chosen) for ex in examples] + \
        [len(ex.prompt) + len(ex.rejected) for ex in examples]


def test_reference_is_a_frozen_copy_of_the_starting_policy(micro_trainer):
    t = micro_trainer("loss=dpo")
    # before any step policy == reference, so every implicit reward is exactly 0
    m = t.batch_metrics(collate(t.eval_examples[:4], 0, True), "eval")[1]
    assert m["rewards_eval/chosen"].item() == 0.0 and m["rewards_eval/rejected"].item() == 0.0
    ref0 = [p.detach().clone() for p in t.reference.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ref0, t.policy.parameters()))
    window = defaultdict(list)
    for _ in range(2):
        t.train_step(window)
    assert all(not p.requires_grad and p.grad is None for p in t.reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref0, t.reference.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(ref0, t.policy.parameters()))
    m = t.batch_metrics(collate(t.eval_examples[:4], 0, True), "eval")[1]
    assert m["rewards_eval/chosen"].item() != 0.0  # after training they differ


def test_sft_and_reference_free_build_no_reference(micro_trainer):
    assert micro_trainer("loss=sft").reference is None
    assert micro_trainer("loss=dpo", "loss.reference_free=true").reference is None
    assert micro_trainer("loss=ipo").reference is not None


@pytest.mark.parametrize("share_prompt", [False, True])
def test_reference_free_dpo_loss_in_both_layouts(micro_trainer, share_prompt):
    """Without a reference the DPO loss is -logsigmoid(beta * (chosen - rejected)),
    computed here from the policy's log-probs, whatever the batch layout."""
    t = micro_trainer("loss=dpo", "loss.reference_free=true", f"share_prompt={str(share_prompt).lower()}")
    batch = t.collate(t.eval_examples[:4])
    with torch.no_grad():
        loss, _ = t.batch_metrics(batch, "eval")
        logps = t.forward_logps(t.policy, batch).sums
    expected = -torch.nn.functional.logsigmoid(t.loss.beta * (logps[:4] - logps[4:])).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


TRAIN_KEYS = {"step", "examples", "tokens", "loss/train", "rewards_train/chosen", "rewards_train/rejected",
              "rewards_train/accuracies", "rewards_train/margins", "logps_train/chosen", "logps_train/rejected",
              "grad_norm", "lr", "tokens_per_s", "memory/params_bytes", "memory/grads_bytes",
              "memory/optimizer_state_bytes", "memory/peak_bytes"}
EVAL_KEYS = {"step", "examples", "loss/eval", "rewards_eval/chosen", "rewards_eval/rejected",
             "rewards_eval/accuracies", "rewards_eval/margins", "logps_eval/chosen", "logps_eval/rejected",
             "generate_eval/accuracy"}


def test_metrics_contract_and_checkpoint(micro_trainer, tmp_path):
    t = micro_trainer("max_steps=4", "eval_every=2", "log_every=2", "save_every=2")
    t.train()
    t.cleanup()
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "loss/train" in r]
    eval_rows = [r for r in rows if "loss/eval" in r]
    assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in eval_rows] == [0, 2, 4]
    assert [r["examples"] for r in train_rows] == [16, 32]                   # batch_size=8
    # tokens: prompt + response of each chosen and rejected sequence, counted by hand over the same batches
    from preference_datasets import BatchStream

    stream, counted = BatchStream(t.train_stream.examples, 8, 0), []
    for _ in range(2):
        pairs = stream.next_examples() + stream.next_examples()
        counted.append(sum(2 * len(ex.prompt) + len(ex.chosen) + len(ex.rejected) for ex in pairs))
    assert [r["tokens"] for r in train_rows] == [counted[0], counted[0] + counted[1]]
    for r in train_rows:
        assert TRAIN_KEYS <= set(r)
        assert r["memory/optimizer_state_bytes"] == r["memory/optimizer_state/exp_avg_bytes"] + \
            r["memory/optimizer_state/exp_avg_sq_bytes"] + r["memory/optimizer_state/step_bytes"]
    assert all(EVAL_KEYS <= set(r) for r in eval_rows)
    # checkpoints: HF format + tokenizer, LATEST names the newest, nothing half-written left over
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "LATEST").read_text().strip() == "step-4"
    assert sorted(p.name for p in ckpts.iterdir()) == ["LATEST", "step-2", "step-4"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(ckpts / "step-4")
    tok = AutoTokenizer.from_pretrained(ckpts / "step-4")
    assert (ckpts / "step-4" / "model.safetensors").is_file()
    for a, b in zip(model.parameters(), t.policy.parameters()):
        assert torch.equal(a, b)
    assert tok("abc")["input_ids"] == t.tokenizer("abc")["input_ids"]
    # resolved config saved in the run dir
    assert "optimizer:" in (tmp_path / "config.yaml").read_text()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    from conftest import make_trainer
    a = make_trainer(tmp_path / "a", "optimizer=SGD", "lr=0.1", "max_grad_norm=null")
    b = make_trainer(tmp_path / "b", "optimizer=SGD", "lr=0.1", "max_grad_norm=null", "gradient_accumulation_steps=4")
    a.train_step(defaultdict(list))
    b.train_step(defaultdict(list))
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bad_batch_split_and_bf16_on_cpu_are_config_errors(micro_trainer):
    with pytest.raises(ConfigError, match="divisible"):
        micro_trainer("batch_size=6", "gradient_accumulation_steps=4")
    with pytest.raises(ConfigError, match="precision=bf16 on CPU"):
        micro_trainer("precision=bf16", "device=cpu")


def group_options(group):
    """The YAML options of `group`; for losses, every registry entry (their nodes are generated)."""
    from prefopt.losses import all_names

    yamls = sorted(p.stem for p in (ROOT / "config" / group).glob("*.yaml"))
    return sorted(n for n in all_names() if n != "sum") if group == "loss" else yamls   # sum needs loss.terms


@pytest.mark.parametrize("group", ["model", "loss", "dataset", "trainer", "optimizer"])
def test_every_config_option_composes(group):
    for option in group_options(group):
        cfg = compose(f"{group}={option}")
        assert cfg[group].name in (option, "dpo") or group == "model" or cfg[group].get("name")   # loss=sigmoid is dpo


@pytest.mark.parametrize("loss", group_options("loss"))
def test_every_loss_builds_and_steps(micro_trainer, loss):
    t = micro_trainer(f"loss={loss}")
    window = defaultdict(list)
    t.train_step(window)
    assert torch.isfinite(window["loss/train"][0])
