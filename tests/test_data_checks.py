"""Data that cannot teach, text that is not text, and BOS.

- pairs with chosen == rejected: all of them is a one-line refusal, some of
  them are counted in one warning and dropped from training;
- eval rows whose prompt is also in train: counted in one warning;
- a lone UTF-16 surrogate (a JSON "\\ud800" escape) is a bad row like any
  other: one line naming file, row and field, or skipped and counted;
- data.add_bos: the prompt starts with BOS as the tokenizer's convention says
  (auto), or never (the reference repo), and truncation keeps it.
The last tests run `python train.py` as a user would.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, run_cli
from omegaconf import OmegaConf
from test_bad_inputs import SMALL, error_line

from preference_datasets import (
    IGNORE_INDEX,
    BadRows,
    PreferenceExample,
    TokenizedExample,
    collate,
    drop_identical_pairs,
    get_examples,
    prompt_bos,
    split_overlap_warning,
    tokenize_example,
    tokenize_rows,
    tokenizer_adds_bos,
)
from prefopt.models import SPECIAL_TOKENS, byte_tokenizer
from utils import ConfigError

SURROGATE_ROW = '{"prompt": "caf\\ud800", "chosen": "a", "rejected": "b"}\n'   # the JSON escape, as in a file


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def pair(prompt, chosen, rejected):
    return TokenizedExample(list(prompt), list(chosen), None if rejected is None else list(rejected))


# ----------------------------------------------------------------------------
# chosen == rejected

def test_all_identical_pairs_are_refused_in_one_line():
    train = [pair([1, 2], [3, 2], [3, 2]) for _ in range(5)]
    with pytest.raises(ConfigError) as e:
        drop_identical_pairs(train, [], max_length=48)
    message = one_line(e)
    assert message.startswith("all 5 train pairs have chosen == rejected")
    assert "zero gradient" in message and "loss=sft" in message   # what was wrong, what to do


def test_some_identical_pairs_are_counted_dropped_and_eval_counted():
    good, same = pair([1], [3, 2], [4, 2]), pair([1], [5, 2], [5, 2])
    train = [good, same, good, same, same, good, good]
    eval_ = [good, same, good]
    kept, warning = drop_identical_pairs(train, eval_, max_length=48)
    assert kept == [good] * 4                          # order kept, identical pairs gone
    assert "\n" not in warning
    assert warning.startswith("warning: 3 of 7 train pairs have chosen == rejected")
    assert "dropped from training" in warning and "zero gradient" in warning and "dilutes" in warning
    assert "1 of 3 eval pairs too (kept in eval" in warning
    # eval only: counted, nothing dropped
    kept, warning = drop_identical_pairs([good, good], [same], max_length=48)
    assert kept == [good, good] and warning.startswith("warning: 1 of 1 eval pairs have chosen == rejected")
    assert drop_identical_pairs([good], [good]) == ([good], None)


def test_sft_rows_without_rejected_are_not_pairs():
    rows = [pair([1], [3, 2], None)] * 3
    assert drop_identical_pairs(rows, rows) == (rows, None)


def test_pairs_the_tokenizer_makes_identical_count_too():
    """Compared as token ids after truncation: responses that differ only past
    max_length are the same sequence to the model (zero gradient too)."""
    tok = byte_tokenizer()
    differ_late = tokenize_example(PreferenceExample("p" * 10, "abcdefgh-one", "abcdefgh-two"), tok, 16, 8)
    differ = tokenize_example(PreferenceExample("p" * 10, "abcx", "abcy"), tok, 16, 8)
    assert differ_late.chosen == differ_late.rejected
    kept, warning = drop_identical_pairs([differ_late, differ], [], max_length=16)
    assert kept == [differ] and "1 of 2 train pairs" in warning and "max_length=16" in warning


# ----------------------------------------------------------------------------
# train/eval overlap

def test_eval_prompts_seen_in_train_are_counted_in_one_warning():
    train = [PreferenceExample("a", "1", "2"), PreferenceExample("b", "1", "2"), PreferenceExample("c", "1", "2")]
    eval_ = [PreferenceExample("a", "1", "2"),     # the same pair
             PreferenceExample("b", "9", "8"),     # the same prompt, other responses
             PreferenceExample("z", "1", "2")]     # new
    warning = split_overlap_warning(train, eval_)
    assert "\n" not in warning
    assert warning.startswith("warning: 2 of 3 eval rows share their prompt with a train row")
    assert "(1 of them the same prompt, chosen and rejected)" in warning and "dataset.eval_path" in warning
    assert split_overlap_warning(train, [PreferenceExample("z", "1", "2")]) is None


def test_bundled_task_has_no_overlap():
    cfg = OmegaConf.create({"name": "synthetic", "n_train": 200, "n_eval": 50, "min_len": 3, "max_len": 7, "seed": 1})
    assert split_overlap_warning(get_examples(cfg, "train"), get_examples(cfg, "eval")) is None


# ----------------------------------------------------------------------------
# A lone UTF-16 surrogate is a bad row.

def jsonl_cfg(path, **overrides):
    cfg = OmegaConf.load(ROOT / "config" / "dataset" / "jsonl.yaml")
    cfg.path, cfg.n_eval = str(path), 2
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


GOOD = "".join(json.dumps({"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)}) + "\n"
               for i in range(6))


@pytest.mark.parametrize("row,where", [
    (SURROGATE_ROW, 'row 7: field "prompt" holds a lone UTF-16 surrogate (\\ud800 at character 4)'),
    ('{"prompt": "q", "chosen": "a\\udfff", "rejected": "b"}\n', 'row 7: field "chosen" holds a lone UTF-16 surrogate'),
    ('{"prompt": [{"role": "user", "content": "\\udc00x"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}\n',
     'row 7: field "prompt", message 1: "content" holds a lone UTF-16 surrogate (\\udc00 at character 1)'),
])
def test_lone_surrogate_is_a_one_line_bad_row(tmp_path, row, where):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + row + GOOD)
    with pytest.raises(ConfigError) as e:
        get_examples(jsonl_cfg(path), "train")
    message = one_line(e)
    assert message.startswith(f"{path}: {where}"), message
    assert "\ud800" not in message and "\udc00" not in message   # the message itself prints anywhere
    # with data.skip_bad_rows=true: skipped and counted, the rest loads and tokenizes
    bad = BadRows(skip=True)
    rows = get_examples(jsonl_cfg(path), "train", bad) + get_examples(jsonl_cfg(path), "eval", bad)
    assert bad.count == 1 and where in bad.first and len(rows) == 12
    tok = byte_tokenizer()
    assert all(tokenize_example(r, tok, 64, 32).chosen for r in rows)


def test_surrogate_pairs_are_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + '{"prompt": "smile \\ud83d\\ude00", "chosen": "a", "rejected": "b"}\n')
    rows = get_examples(jsonl_cfg(path, n_eval=1), "eval")
    assert rows[0].prompt == "smile \U0001F600"


def test_hh_transcript_with_a_lone_surrogate(tmp_path):
    path = tmp_path / "hh.jsonl"
    ok = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path.write_text((json.dumps(ok) + "\n") * 4
                    + '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: \\ud800", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}\n')
    cfg = OmegaConf.load(ROOT / "config" / "dataset" / "hh.yaml")
    cfg.path, cfg.n_eval = str(path), 1
    with pytest.raises(ConfigError, match='row 5: field "chosen" holds a lone UTF-16 surrogate'):
        get_examples(cfg, "train")


# ----------------------------------------------------------------------------
# BOS

def bos_tokenizer():
    """The byte tokenizer with a post-processor that puts <s> first, as
    Llama's and most pretrained tokenizers do; built offline."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(byte_tokenizer().backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def run_cfg(add_bos="auto", truncation_mode="keep_start", max_length=64, max_prompt_length=32, chat_template=False):
    return OmegaConf.create({"max_length": max_length, "max_prompt_length": max_prompt_length,
                             "data": {"add_bos": add_bos},
                             "dataset": {"truncation_mode": truncation_mode, "chat_template": chat_template}})


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_which_tokenizers_add_bos():
    tok = bos_tokenizer()
    assert tok("x")["input_ids"] == [1] + ids(tok, "x")
    assert tokenizer_adds_bos(tok) and not tokenizer_adds_bos(byte_tokenizer())
    assert prompt_bos(tok, "auto") == 1 and prompt_bos(tok, "never") is None and prompt_bos(tok, False) is None
    assert prompt_bos(byte_tokenizer(), "auto") is None and prompt_bos(byte_tokenizer(), "always") == 1
    with pytest.raises(ConfigError, match="data.add_bos=sometimes is not one of auto, always, never"):
        prompt_bos(tok, "sometimes")


def test_byte_tokenizer_ids_do_not_change():
    """auto with a tokenizer that adds no BOS is the reference tokenization."""
    tok = byte_tokenizer()
    rows = [PreferenceExample("dcba=", "abcd", "abdc"), PreferenceExample("p" * 50, "c" * 20, "r")]
    for mode in ("keep_start", "keep_end"):
        for add_bos in ("auto", "never"):
            got = tokenize_rows(rows, tok, run_cfg(add_bos, mode, max_length=40, max_prompt_length=16))
            assert got == [tokenize_example(r, tok, 40, 16, mode) for r in rows]
    # and the reference code path itself: prompt ids as the text's bytes
    assert tokenize_rows(rows[:1], tok, run_cfg())[0].prompt == ids(tok, "dcba=")


def test_auto_puts_one_bos_first_and_never_none():
    tok = bos_tokenizer()
    rows = [PreferenceExample("dcba=", "abcd", "abdc"), PreferenceExample("<s>dcba=", "abcd", "abdc")]
    auto = tokenize_rows(rows, tok, run_cfg("auto"))
    assert auto[0].prompt == [1] + ids(tok, "dcba=")
    assert auto[1].prompt == auto[0].prompt            # text already starting with <s>: not twice
    assert auto[0].chosen == ids(tok, "abcd") + [2] and 1 not in auto[0].chosen + auto[0].rejected
    never = tokenize_rows(rows[:1], tok, run_cfg("never"))
    assert never[0].prompt == ids(tok, "dcba=")
    assert tokenize_rows(rows[:1], byte_tokenizer(), run_cfg("always"))[0].prompt == [1] + ids(tok, "dcba=")


def test_chat_template_decides_bos_under_auto():
    """A chat-templated prompt keeps what the template wrote (Hugging Face's
    convention, which TRL follows): a template that writes <s> gets exactly
    one, a template that writes none gets none."""
    tok = bos_tokenizer()
    row = [PreferenceExample("dcba=", "abcd", "abdc")]
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tokenize_rows(row, tok, run_cfg(chat_template=True))[0].prompt == [1] + ids(tok, "[dcba=]")
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tokenize_rows(row, tok, run_cfg(chat_template=True))[0].prompt == ids(tok, "[dcba=]")
    assert tokenize_rows(row, tok, run_cfg("always", chat_template=True))[0].prompt == [1] + ids(tok, "[dcba=]")


@pytest.mark.parametrize("mode,kept", [("keep_end", "PQRSTUV"), ("keep_start", "abcdefg")])
def test_truncation_keeps_bos(mode, kept):
    tok = bos_tokenizer()
    row = PreferenceExample("abcdefghijklmnopPQRSTUV", "x" * 20, "y")
    t = tokenize_rows([row], tok, run_cfg("auto", mode, max_length=24, max_prompt_length=8))[0]
    assert t.prompt == [1] + ids(tok, kept)            # 8 tokens: BOS + 7 of the text
    assert len(t.prompt) + len(t.chosen) == 24 and t.chosen == ids(tok, "x" * 16)
    # a template-written BOS is protected the same way
    t2 = tokenize_example(PreferenceExample("<s>" + row.prompt, row.chosen, row.rejected), tok, 24, 8, mode, bos_id=1)
    assert t2 == t
    # never: the reference repo's truncation, no BOS
    assert tokenize_rows([row], tok, run_cfg("never", mode, 24, 8))[0] == tokenize_example(row, tok, 24, 8, mode)


def test_bos_prompt_is_masked_and_never_scored():
    tok = bos_tokenizer()
    rows = [PreferenceExample("ab=", "ab", "ba"), PreferenceExample("abcd=", "abcd", "abdc")]
    exs = tokenize_rows(rows, tok, run_cfg())
    b = collate(exs, tok.pad_token_id, with_rejected=True)
    assert b["input_ids"][:, 0].tolist() == [1, 1, 1, 1]
    # row 0: <s> a b = (4 masked), a b </s> scored, then padding
    assert b["labels"][0].tolist()[:4] == [IGNORE_INDEX] * 4
    assert b["labels"][0].tolist()[4:7] == ids(tok, "ab") + [2]
    assert (b["labels"][:, 0] == IGNORE_INDEX).all()
    assert b["n_scored"].tolist() == [3, 5, 3, 5]
    # the scored targets are exactly the responses: no prompt token, BOS included, is ever a target
    per_seq = [b["score_targets"][b["score_seq"] == s].tolist() for s in range(4)]
    assert per_seq == [exs[0].chosen, exs[1].chosen, exs[0].rejected, exs[1].rejected]


def test_shared_prompt_rows_with_bos_match_separate_rows():
    """share_prompt=true with a BOS-led prompt: the same per-sequence log-probs
    as the separate layout and as each sequence run alone (tiny Llama, SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.losses import sequence_stats
    from trainers import _token_logps

    tok = bos_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa",
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    rows = [PreferenceExample("dcba=", "abcd", "abdc"), PreferenceExample("ba=", "ab", "bbba"),
            PreferenceExample("fedcba=", "abcdef", "abcdfe")]
    exs = tokenize_rows(rows, tok, run_cfg())
    assert all(ex.prompt[0] == 1 and ex.prompt[1] != 1 for ex in exs)

    def logps(share):
        b = collate(exs, tok.pad_token_id, with_rejected=True, share_prompt=share)
        with torch.no_grad():
            tokens, _ = _token_logps(model, b["input_ids"], b["attention_mask"], b.get("position_ids"),
                                     b["score_rows"], b["score_targets"])
            out = sequence_stats(tokens, b["score_seq"], b["n_scored"])
            return out.sums, out.tokens

    (shared, n_shared), (separate, n_separate) = logps(True), logps(False)
    assert n_shared.tolist() == n_separate.tolist() == [len(e.chosen) for e in exs] + [len(e.rejected) for e in exs]
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-5)
    alone = []
    with torch.no_grad():
        for p, r in [(e.prompt, e.chosen) for e in exs] + [(e.prompt, e.rejected) for e in exs]:
            out = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
            alone.append(sum(out[len(p) + j - 1, t].item() for j, t in enumerate(r)))
    assert separate.tolist() == pytest.approx(alone, abs=1e-4)


# ----------------------------------------------------------------------------
# As a user sees it: python train.py ...

def rows_jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


DISTINCT = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(12)]
SAME = [{"prompt": f"{i}*{i}=", "chosen": str(i * i), "rejected": str(i * i)} for i in range(12)]
CLI = {
    "identical": (rows_jsonl(SAME), []),
    "surrogate": (rows_jsonl(DISTINCT) + SURROGATE_ROW, []),
    "skip": (rows_jsonl(SAME[:2] + DISTINCT) + SURROGATE_ROW, ["data.skip_bad_rows=true"]),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    def run(name):
        text, extra = CLI[name]
        work = tmp_path_factory.mktemp(name)
        (work / "d.jsonl").write_text(text)
        return run_cli(*SMALL, "dataset=jsonl", "dataset.path=d.jsonl", "dataset.n_eval=4", *extra, cwd=work)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(CLI, pool.map(run, CLI)))


def assert_one_line_refusal(r, expected):
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert expected in error_line(r.stderr), r.stderr[-3000:]
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1, r.stderr[-3000:]


def test_cli_refuses_all_identical_pairs(cli):
    assert_one_line_refusal(cli["identical"], "error: all 8 train pairs have chosen == rejected")


def test_cli_refuses_a_lone_surrogate(cli):
    assert_one_line_refusal(cli["surrogate"], 'error: d.jsonl: row 13: field "prompt" holds a lone UTF-16 surrogate')


def test_cli_skips_the_surrogate_and_drops_identical_pairs(cli):
    r = cli["skip"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert 'skipped 1 malformed rows (data.skip_bad_rows=true); first: d.jsonl: row 15: field "prompt"' in r.stderr
    warnings = [l for l in r.stderr.splitlines() if "chosen == rejected" in l]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 of 10 train pairs have chosen == rejected")
