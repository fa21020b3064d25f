"""The bundled dataset, tokenization, truncation, masking and batching."""
import pytest
import torch
from omegaconf import OmegaConf

from preference_datasets import IGNORE_INDEX, BatchStream, PreferenceExample, collate, get_examples, tokenize_example
from prefopt.models import byte_tokenizer
from utils import ConfigError

SYNTH = OmegaConf.create({"name": "synthetic", "n_train": 300, "n_eval": 50, "min_len": 3, "max_len": 7,
                          "seed": 1234})


def test_synthetic_is_deterministic_verifiable_and_split():
    train, eval_ = get_examples(SYNTH, "train"), get_examples(SYNTH, "eval")
    assert len(train) == 300 and len(eval_) == 50
    assert train == get_examples(SYNTH, "train")                      # deterministic
    assert not {r.prompt for r in train} & {r.prompt for r in eval_}  # held out
    for r in train + eval_:
        letters = r.prompt.rstrip("=")
        assert r.chosen == "".join(sorted(letters))                   # chosen is the right answer
        assert r.rejected != r.chosen and sorted(r.rejected) == sorted(r.chosen)
        diffs = [i for i, (a, b) in enumerate(zip(r.chosen, r.rejected)) if a != b]
        assert len(diffs) == 2 and diffs[1] == diffs[0] + 1           # two neighbours swapped


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Sort: dbca → abcd ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 259 and tok.pad_token_id == 0 and tok.eos_token_id == 2


def test_tokenize_appends_eos_and_truncates_like_reference():
    tok = byte_tokenizer()
    ex = PreferenceExample(prompt="p" * 30, chosen="c" * 20, rejected="r" * 5)
    t = tokenize_example(ex, tok, max_length=40, max_prompt_length=16, truncation_mode="keep_end")
    # prompt first cut to 16 (too long: 30 + 21 > 40); then responses cut to 40 - 16 = 24 -> chosen 21 fits
    assert len(t.prompt) == 16 and len(t.chosen) == 21 and len(t.rejected) == 6
    assert t.chosen[-1] == tok.eos_token_id and t.rejected[-1] == tok.eos_token_id
    t = tokenize_example(ex, tok, max_length=30, max_prompt_length=16, truncation_mode="keep_start")
    assert len(t.prompt) == 16 and len(t.chosen) == 14 and len(t.rejected) == 6
    # keep_start keeps the beginning, keep_end the end
    ex2 = PreferenceExample(prompt="abcdefghij" * 3, chosen="x" * 20, rejected="y")
    start = tokenize_example(ex2, tok, 30, 4, "keep_start").prompt
    end = tokenize_example(ex2, tok, 30, 4, "keep_end").prompt
    assert tok.decode(start) == "abcd" and tok.decode(end) == "ghij"


def test_collate_masks_prompt_and_padding_and_pads_to_longest():
    tok = byte_tokenizer()
    exs = [tokenize_example(PreferenceExample("ab=", "ab", "ba"), tok, 64, 32),
           tokenize_example(PreferenceExample("abcd=", "abcd", "abdc"), tok, 64, 32)]
    b = collate(exs, tok.pad_token_id, with_rejected=True)
    assert b["input_ids"].shape == (4, 10)           # 2 chosen + 2 rejected, longest is 5 + 4 + eos
    # row 0: prompt "ab=" (3), response "ab"+eos (3), padding (4)
    assert b["labels"][0].tolist()[:3] == [IGNORE_INDEX] * 3
    assert b["labels"][0].tolist()[3:6] == tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b["labels"][0].tolist()[6:] == [IGNORE_INDEX] * 4
    assert b["attention_mask"][0].tolist() == [1] * 6 + [0] * 4
    # rows 2-3 are the rejected responses of rows 0-1, same prompts
    assert torch.equal(b["input_ids"][2, :3], b["input_ids"][0, :3])
    assert tok.decode(b["input_ids"][3, 5:9]) == "abdc"
    sft = collate(exs, tok.pad_token_id, with_rejected=False)
    assert sft["input_ids"].shape == (2, 10)


def test_batch_stream_order_is_a_function_of_position():
    items = list(range(10))
    a = BatchStream(items, 4, seed=3)
    seen = [a.next_examples() for _ in range(5)]
    # each epoch covers 8 distinct items (ragged tail dropped), epochs differ in order
    assert len(set(seen[0] + seen[1])) == 8
    b = BatchStream(items, 4, seed=3)
    b.load_state({"epoch": 1, "index": 4})
    assert b.next_examples() == seen[3]
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        BatchStream(items[:2], 4, seed=0)
