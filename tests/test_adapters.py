"""peft=lora / peft=dora: adapters through Hugging Face PEFT on a frozen base.
Byte counts against formulas from the model's shapes, the reference against
the plain base model, the merged export against the adapted model."""
import copy
from collections import defaultdict

import pytest
import torch
from conftest import read_metrics

from utils import ConfigError

LORA = ["peft=lora", "peft.r=4", "peft.alpha=8", "loss=dpo"]


def decoder_linears(model):
    """(in, out) of every nn.Linear inside the decoder blocks: what
    target_modules=all-linear adapts (not the LM head)."""
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name and "lora" not in name]


def test_adapter_bytes_equal_their_formula(micro_trainer):
    """Trainable = r (in + out) per adapted linear, 4 bytes each in fp32;
    gradients and AdamW state (2 buffers + a step per tensor) cover the
    adapters alone; no reference copy."""
    t = micro_trainer(*LORA, "optimizer=AdamW")
    base = t.policy.get_base_model()
    linears = decoder_linears(base)
    assert linears, "no adapted layers found"
    adapter_elements = sum(4 * (i + o) for i, o in linears)
    t.train_step(defaultdict(list))
    m = t.memory_metrics()
    assert m["memory/params_trainable_bytes"] == 4 * adapter_elements
    assert m["memory/grads_bytes"] == 4 * adapter_elements
    assert m["memory/optimizer_state_bytes"] == 2 * 4 * adapter_elements + 4 * 2 * len(linears)
    base_elements = sum(p.numel() for n, p in base.named_parameters() if "lora" not in n)
    assert m["memory/params_bytes"] == 4 * (base_elements + adapter_elements)
    assert m["memory/reference_params_bytes"] == 0 and t.reference is None


def test_adam_mini_keeps_one_second_moment_per_adapter_row(micro_trainer):
    """Adam-mini on adapters: one v per row of lora_A (r rows) and lora_B
    (out rows), whichever partition."""
    t = micro_trainer(*LORA, "optimizer=adam_mini")
    linears = decoder_linears(t.policy.get_base_model())
    t.train_step(defaultdict(list))
    rows = sum(4 + o for _, o in linears)   # r rows of A, out rows of B
    assert t.memory_metrics()["memory/optimizer_state/exp_avg_sq_bytes"] == 4 * rows


def test_reference_is_the_base_model_exactly(micro_trainer):
    """With the adapters disabled the policy gives the base model's log-probs,
    bit for bit, also after the adapters have trained."""
    t = micro_trainer(*LORA, "optimizer=SGD", "lr=0.5")
    for _ in range(2):
        t.train_step(defaultdict(list))
    batch = {k: v.to(t.device) for k, v in t.collate(t.eval_examples[:4]).items()}
    base = copy.deepcopy(t.policy).unload()   # the base modules, adapters removed
    with torch.no_grad():
        reference = t.reference_logps(batch)
        plain = t.forward_logps(base, batch).sums
        adapted = t.forward_logps(t.policy, batch).sums
    assert torch.equal(reference, plain)
    assert not torch.allclose(adapted, plain), "the adapters did not change the model"


def test_merged_export_reloads_in_plain_transformers(micro_trainer, tmp_path):
    """export.merged=true: the last checkpoint holds PEFT's adapter files and
    merged/, a model transformers loads alone, with the adapted model's
    log-probs (1e-5)."""
    from transformers import AutoModelForCausalLM

    t = micro_trainer(*LORA, "optimizer=SGD", "lr=0.5", "max_steps=2", "export.merged=true")
    t.train()
    ckpt = t.run_dir / "checkpoints" / "step-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "merged", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = {k: v.to(t.device) for k, v in t.collate(t.eval_examples[:4]).items()}
    t.policy.eval()
    with torch.no_grad():
        ours = t.forward_logps(t.policy, batch).sums
        theirs = t.forward_logps(merged.eval(), batch).sums
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_dora_trains(micro_trainer):
    t = micro_trainer("peft=dora", "peft.r=4", "loss=dpo")
    assert any("lora_magnitude_vector" in n for n, p in t.policy.named_parameters() if p.requires_grad)
    window = defaultdict(list)
    t.train_step(window)
    assert torch.isfinite(window["loss/train"][0])


@pytest.mark.parametrize("overrides, message", [
    (["peft=lora", "peft.quantize=4bit"], "peft.quantize=4bit (QLoRA) needs bitsandbytes' 4-bit kernels on a CUDA GPU"),
    (["peft=lora", "loss.sync_ref_model=true"], "the reference is the base model, which cannot move"),
    (["peft=lora", "peft.target_modules=[nonexistent]"], "check peft.target_modules"),
])
def test_bad_adapter_settings_are_one_line_errors(micro_trainer, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")) as e:
        micro_trainer(*overrides)
    assert "\n" not in str(e.value)


def test_an_adapter_checkpoint_is_a_model_archive(tmp_path):
    """model.archive=<a LoRA run>: the next run starts from that run's adapted
    model (adapters folded into the base it was trained on, 1e-5), trains
    fresh adapters on it, and uses it as the reference. Another base (here:
    another seed) is refused in one line."""
    from conftest import make_trainer

    sft = make_trainer(tmp_path / "sft", "peft=lora", "peft.r=4", "loss=sft", "optimizer=SGD", "lr=0.5",
                       "max_steps=2")
    sft.train()
    sft.policy.eval()
    dpo = make_trainer(tmp_path / "dpo", *LORA, f"model.archive={tmp_path / 'sft'}")
    examples = dpo.eval_examples[:4]
    with torch.no_grad():
        batch = {k: v.to(dpo.device) for k, v in dpo.collate(examples).items()}
        start = dpo.forward_logps(dpo.policy, batch).sums      # fresh adapters: B = 0
        reference = dpo.reference_logps(batch)
        sft_batch = {k: v.to(sft.device) for k, v in collate_like(sft, examples).items()}
        trained = sft.forward_logps(sft.policy, sft_batch).sums
    torch.testing.assert_close(start[:4], trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference, start, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="trained on other base weights"):
        make_trainer(tmp_path / "other", *LORA, f"model.archive={tmp_path / 'sft'}", "seed=1")


def collate_like(trainer, examples):
    """The chosen responses of `examples` as an SFT batch of `trainer`."""
    from preference_datasets import collate

    return collate(examples, trainer.tokenizer.pad_token_id, with_rejected=False)


def test_planner_counts_llama2_7b_adapters():
    """Llama2-7B, LoRA on all 7 linears of its 32 blocks: r (in + out) each:
    4 x r (4096 + 4096) + 2 x r (4096 + 11008) + r (11008 + 4096) per block."""
    from conftest import compose

    from prefopt.memory import plan

    for r in (16, 128):
        p = plan(compose("model=llama2-7b", "plan_only=true", "peft=lora", f"peft.r={r}"))
        trainable = 32 * r * (4 * 8192 + 3 * 15104)
        assert p["trainable_params"] == trainable
        assert p["grads_bytes"] == 4 * trainable
        assert p["reference_params_bytes"] == 0
        assert p["optimizer_state"]["exp_avg"] == p["optimizer_state"]["exp_avg_sq"] == 4 * trainable
    assert plan(compose("model=llama2-7b", "plan_only=true", "peft=lora"))["trainable_params"] == 39_976_960


def test_kill_free_resume_of_adapters_is_exact(tmp_path):
    """Stop after 2 steps (checkpoint), resume to 4: the same metrics as 4
    steps at once (the kill -9 form is in test_resume.py)."""
    from conftest import make_trainer

    def run(run_dir, steps, resume=False):
        t = make_trainer(run_dir, *LORA, "optimizer=AdamW", f"max_steps={steps}", "save_every=2",
                         *(["resume=true"] if resume else []))
        t.train()
        t.cleanup()

    run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, resume=True)
    skip = {"tokens_per_s", "memory/peak_bytes"}

    def train_rows(run_dir):   # the split run also evaluates at its first end (step 2)
        return [{k: v for k, v in r.items() if k not in skip} for r in read_metrics(run_dir) if "loss/train" in r]

    assert len(train_rows(tmp_path / "whole")) == 4
    assert train_rows(tmp_path / "whole") == train_rows(tmp_path / "split")
