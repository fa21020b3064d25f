"""loss.precompute_reference=true with reference_cache_dir: the reference
log-probs go to disk once; a later run with the same key builds no reference
model and runs no reference forward; a damaged entry is found and recomputed."""
from collections import defaultdict

import pytest
import torch

import trainers
from prefopt import reference_cache

CACHED = ["loss=dpo", "loss.precompute_reference=true"]


def cache_files(directory):
    return sorted(directory.glob("*.safetensors"))


def counting_forwards(monkeypatch):
    """Count every model forward the trainer makes (policy or reference)."""
    calls = []
    original = trainers._token_logps

    def counted(model, *args, **kwargs):
        calls.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(trainers, "_token_logps", counted)
    return calls


def test_second_run_reads_the_cache_and_runs_no_reference(micro_trainer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = micro_trainer(*CACHED, f"reference_cache_dir={cache}", f"run_dir={tmp_path / 'a'}")
    [entry] = cache_files(cache)
    expected = [ex.reference_logps for ex in first.train_stream.examples + first.eval_examples]
    window = defaultdict(list)
    first.train_step(window)

    calls = counting_forwards(monkeypatch)
    second = micro_trainer(*CACHED, f"reference_cache_dir={cache}", f"run_dir={tmp_path / 'b'}")
    assert calls == [], "setup ran a forward: the reference was recomputed"
    assert second.reference is None and not second.adapter_reference
    assert [ex.reference_logps for ex in second.train_stream.examples + second.eval_examples] == expected
    again = defaultdict(list)
    second.train_step(again)
    assert all(model is second.policy for model in calls)   # the policy's forward only
    assert again["loss/train"][0].item() == window["loss/train"][0].item()
    assert cache_files(cache) == [entry]


def test_a_different_reference_is_a_different_entry(micro_trainer, tmp_path):
    cache = tmp_path / "cache"
    micro_trainer(*CACHED, f"reference_cache_dir={cache}", f"run_dir={tmp_path / 'a'}")
    micro_trainer(*CACHED, f"reference_cache_dir={cache}", "seed=1", f"run_dir={tmp_path / 'b'}")   # other init
    micro_trainer(*CACHED, f"reference_cache_dir={cache}", "dataset.n_train=128", f"run_dir={tmp_path / 'c'}")  # other data
    assert len(cache_files(cache)) == 3


@pytest.mark.parametrize("damage", ["flip a byte of the log-probs", "truncate", "wrong number of pairs"])
def test_a_damaged_entry_is_recomputed(micro_trainer, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    first = micro_trainer(*CACHED, f"reference_cache_dir={cache}", f"run_dir={tmp_path / 'a'}")
    expected = [ex.reference_logps for ex in first.train_stream.examples + first.eval_examples]
    [entry] = cache_files(cache)
    data = bytearray(entry.read_bytes())
    if damage == "flip a byte of the log-probs":
        data[-3] ^= 0xFF
        entry.write_bytes(bytes(data))
    elif damage == "truncate":
        entry.write_bytes(bytes(data[: len(data) // 2]))
    else:
        reference_cache.write(entry, torch.zeros(3, 2), {"pairs": 3})
    capsys.readouterr()
    second = micro_trainer(*CACHED, f"reference_cache_dir={cache}", f"run_dir={tmp_path / 'b'}")
    err = capsys.readouterr().err
    assert f"reference cache entry {entry} is damaged" in err and "recomputing it" in err
    assert "precomputed in" in err
    assert [ex.reference_logps for ex in second.train_stream.examples + second.eval_examples] == expected
    logps, problem = reference_cache.read(entry, len(expected))
    assert problem is None and logps.tolist() == [list(pair) for pair in expected]
