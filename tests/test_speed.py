"""The fast paths give the same numbers as the plain ones: LM head only at
scored positions, precomputed reference log-probs, torch.compile; and
bench.py runs end to end and writes its JSON."""
import json
from collections import defaultdict

import pytest
import torch
from conftest import MICRO_MODEL

from preference_datasets import collate
from prefopt.losses import gathered_logps, sequence_logps, sequence_stats


def test_head_only_at_scored_positions_equals_full_logits(micro_trainer):
    t = micro_trainer()
    batch = collate(t.eval_examples[:6], t.tokenizer.pad_token_id, with_rejected=True)
    model = t.policy
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    full = sequence_logps(model.lm_head(hidden), batch["labels"])
    tokens, _ = gathered_logps(hidden, model.lm_head, batch["score_rows"], batch["score_targets"])
    stats = sequence_stats(tokens, batch["score_seq"], batch["n_scored"])
    fast = (stats.sums, stats.tokens)
    assert torch.allclose(fast[0], full[0], atol=1e-5) and torch.equal(fast[1], full[1])
    # and the gradients agree
    g_full = torch.autograd.grad(full[0].sum(), model.lm_head.weight, retain_graph=True)[0]
    g_fast = torch.autograd.grad(fast[0].sum(), model.lm_head.weight)[0]
    assert torch.allclose(g_fast, g_full, atol=1e-5)


def test_shared_prompt_rows_give_the_same_loss_and_gradients(micro_trainer):
    """share_prompt=true (one row per pair) and false (two rows) are the same
    computation: equal DPO loss and equal gradients for every weight."""
    grads = {}
    for share in (False, True):
        t = micro_trainer("loss=dpo", f"share_prompt={str(share).lower()}")
        assert t.share_prompt is share
        batch = t.collate(t.eval_examples[:8])
        assert ("position_ids" in batch) is share and batch["attention_mask"].dim() == (4 if share else 2)
        loss, _ = t.batch_metrics(batch, "train")
        loss.backward()
        grads[share] = (loss.item(), {n: p.grad.clone() for n, p in t.policy.named_parameters()})
    assert grads[True][0] == pytest.approx(grads[False][0], abs=1e-6)
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prompt_mask_and_positions_by_hand():
    """prompt [1, 2], chosen [3, 4], rejected [5]: the rejected token sees the
    prompt and itself only, and sits at position 2 like the first chosen one."""
    from preference_datasets import TokenizedExample

    b = collate([TokenizedExample([1, 2], [3, 4], [5]), TokenizedExample([1], [3], [5, 6])], 0, True, share_prompt=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 3, 5, 6, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 2] and b["position_ids"][1][:4].tolist() == [0, 1, 1, 2]
    assert b["attention_mask"][0, 0, 4].tolist() == [True, True, False, False, True]
    assert b["attention_mask"][0, 0, 3].tolist() == [True, True, True, True, False]
    assert b["attention_mask"][1, 0, 4].tolist() == [False, False, False, False, True]  # padding: itself only
    # scored: (state, token, sequence) = chosen 3 <- 1, 4 <- 2; rejected 5 <- 1 (the prompt's last state)
    triples = set(zip(b["score_rows"].tolist(), b["score_targets"].tolist(), b["score_seq"].tolist()))
    assert triples == {(1, 3, 0), (2, 4, 0), (1, 5, 2), (5, 3, 1), (5, 5, 3), (7, 6, 3)}
    assert b["n_scored"].tolist() == [2, 1, 1, 2] and b["lengths"].tolist() == [4, 2, 3, 3]


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


def test_compiled_forward_matches_eager(micro_trainer):
    """compile=true (share_prompt on, the default): ~25 s cold on 2 cores."""
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


def test_bench_variants_are_measured_interleaved(tmp_path, capsys):
    """--variant: one fresh-process measurement per variant and round, with
    the variant's overrides applied (share_prompt shows in the result)."""
    import bench

    out = tmp_path / "variants.json"
    bench.main(["--variant", "share_prompt=false", "--variant", "", "--rounds", "1", "--steps", "1", "--warmup", "1",
                "--max-wait", "0", "--peak-size", "512", "--out", str(out), *MICRO_MODEL,
                "dataset.min_len=3", "dataset.max_len=7", "dataset.n_train=64"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [v["overrides"] for v in summary["variants"]] == ["share_prompt=false", ""]
    assert summary["variants"][0]["vs_first_median"] == 1.0
    runs = json.loads(out.read_text())["runs"]
    assert [r["share_prompt"] for r in runs] == [False, True]


def test_bench_optim_reports_exact_state_bytes_per_optimizer(monkeypatch, capsys):
    """bench_optim.py on the small model: registry names and its own variants
    in one run; state bytes per parameter checked against the formulas
    (AdamW 2 fp32 buffers + a step scalar per tensor; RMSprop 1; SGD 0)."""
    import bench_optim

    monkeypatch.setattr("sys.argv", ["bench_optim.py", "--model", "llama-1m", "--steps", "1", "--warmup", "1",
                                     "--optimizers", "AdamW,RMSprop,SGD,adam_mini"])
    bench_optim.main()
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out if line and line.split()[0] in ("AdamW", "RMSprop", "SGD", "adam_mini")}
    params = json.loads(out[-1])["params"]
    n_tensors = 4 * 9 + 3  # per layer: q,k,v,o, gate,up,down, 2 norms; + embed, lm_head, final norm
    assert int(rows["AdamW"][4].replace(",", "")) == 8 * params + 4 * n_tensors
    assert int(rows["RMSprop"][4].replace(",", "")) == 4 * params + 4 * n_tensors
    assert int(rows["SGD"][4].replace(",", "")) == 0
    assert 4 * params < int(rows["adam_mini"][4].replace(",", "")) < 6 * params
    assert "adam_mini_vs_adamw_step_ratio" in json.loads(out[-1])
