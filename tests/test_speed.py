"""The fast paths give the same numbers as the plain ones: LM head only at
scored positions, precomputed reference log-probs, torch.compile; and
bench.py runs end to end and writes its JSON."""
import json
import os
from collections import defaultdict

import pytest
import torch

from conftest import MICRO_MODEL
from losses import head_sequence_logps, scored_positions, sequence_logps
from preference_datasets import collate


def test_head_only_at_scored_positions_equals_full_logits(micro_trainer):
    t = micro_trainer()
    batch = collate(t.eval_examples[:6], t.tokenizer.pad_token_id, with_rejected=True)
    model = t.policy
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    full = sequence_logps(model.lm_head(hidden), batch["labels"])
    for index in (None, batch["scored_index"]):
        fast = head_sequence_logps(hidden, model.lm_head, batch["labels"], index)
        assert torch.allclose(fast[0], full[0], atol=1e-5) and torch.equal(fast[1], full[1])
    assert torch.equal(batch["scored_index"], scored_positions(batch["labels"]))
    # and the gradients agree
    g_full = torch.autograd.grad(full[0].sum(), model.lm_head.weight, retain_graph=True)[0]
    g_fast = torch.autograd.grad(head_sequence_logps(hidden, model.lm_head, batch["labels"])[0].sum(),
                                 model.lm_head.weight)[0]
    assert torch.allclose(g_fast, g_full, atol=1e-5)


def test_precomputed_reference_matches_the_live_reference(micro_trainer):
    live = micro_trainer("loss=dpo")
    window = defaultdict(list)
    live.train_step(window)
    cached = micro_trainer("loss=dpo", "loss.precompute_reference=true")
    assert cached.reference is None  # freed: no reference forward during training
    assert all(ex.reference_logps is not None for ex in cached.train_stream.examples + cached.eval_examples)
    batch = collate(cached.eval_examples[:4], 0, True)
    assert "reference_logps" in batch
    cached_window = defaultdict(list)
    cached.train_step(cached_window)
    # same seed, same first batch: the same loss and rewards as with the live reference
    for key in ("loss/train", "rewards_train/chosen", "rewards_train/margins"):
        assert cached_window[key][0].item() == pytest.approx(window[key][0].item(), abs=1e-5)


@pytest.mark.skipif(not os.environ.get("PREFOPT_TEST_COMPILE"),
                    reason="torch.compile takes minutes on 2 CPU cores; run with PREFOPT_TEST_COMPILE=1")
def test_compiled_forward_matches_eager(micro_trainer):
    eager = micro_trainer("loss=dpo")
    compiled = micro_trainer("loss=dpo", "compile=true")
    a, b = defaultdict(list), defaultdict(list)
    eager.train_step(a)
    compiled.train_step(b)
    assert b["loss/train"][0].item() == pytest.approx(a["loss/train"][0].item(), abs=1e-5)
    assert b["grad_norm"][0].item() == pytest.approx(a["grad_norm"][0].item(), rel=1e-3)


def test_bench_runs_and_writes_json(tmp_path, capsys):
    import bench

    out = tmp_path / "bench.json"
    bench.main(["--steps", "2", "--warmup", "1", "--max-wait", "0", "--peak-size", "1024", "--out", str(out), *MICRO_MODEL,
                "dataset.min_len=3", "dataset.max_len=7", "dataset.n_train=64"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1.5 and summary["peak_gflops"] > 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert set(run["split_s"]) == {"data", "forward", "reference", "backward", "optimizer"}
    assert run["optimizer_state_bytes"] > 0 and run["peak_memory_bytes"] > 0 and run["reference_in_step"]
    assert "other_cpu_pct" in run
