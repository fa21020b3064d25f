"""Unpaired data (KTO's format, prefopt/data/unpaired.py): {"prompt",
"completion", "label"} rows read by dataset=jsonl, pairs split into unpaired
rows, `data.unpaired` (preference_datasets.unpaired_rows) and the label
carried through tokenization. Expected rows and messages are written out by
hand."""
from __future__ import annotations

import json

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from preference_datasets import (
    TokenizedExample,
    apply_chat_template,
    drop_identical_pairs,
    get_examples,
    split_overlap_warning,
    tokenize_example,
    tokenize_rows,
    unpaired_rows,
)
from prefopt import config_checks
from prefopt.data import jsonl
from prefopt.data.types import BadRows, PreferenceExample
from prefopt.data.unpaired import UNPAIRED_MODES, is_unpaired_row, label_counts, unpair, unpaired_mode
from prefopt.models import byte_tokenizer
from utils import ConfigError

E = PreferenceExample


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def write_rows(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def jsonl_cfg(path, n_eval=1, **overrides):
    cfg = OmegaConf.load(ROOT / "config" / "dataset" / "jsonl.yaml")
    cfg.path, cfg.n_eval = str(path), n_eval
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def msg(role, content):
    return {"role": role, "content": content}


# ----------------------------------------------------------------------------
# Reading unpaired rows (dataset=jsonl).

def test_text_rows(tmp_path):
    path = write_rows(tmp_path / "kto.jsonl", [
        {"prompt": "Q: 2+3=", "completion": " 5", "label": True},
        {"prompt": "Q: 2+3=", "completion": " 6", "label": False},
        {"prompt": "Q: capital of Japan?", "completion": " Kyoto", "label": False, "id": 3},   # extra key ignored
        {"prompt": "Q: first month?", "completion": " January", "label": True},
    ])
    train, evals = get_examples(jsonl_cfg(path), "train"), get_examples(jsonl_cfg(path), "eval")
    assert train == [E("Q: 2+3=", " 5", None, True), E("Q: 2+3=", " 6", None, False),
                     E("Q: capital of Japan?", " Kyoto", None, False)]
    assert evals == [E("Q: first month?", " January", None, True)]
    # the same file as .json (a list of rows)
    json_path = tmp_path / "kto.json"
    json_path.write_text(json.dumps([{"prompt": "p", "completion": "c", "label": False}] * 2))
    assert get_examples(jsonl_cfg(json_path), "train") == [E("p", "c", None, False)]


def test_conversational_rows(tmp_path):
    path = write_rows(tmp_path / "chat.jsonl", [
        # prompt as a message list, the reply alone
        {"prompt": [msg("user", "Largest planet?")], "completion": [msg("assistant", "Jupiter.")], "label": True},
        # system message in the prompt; the completion repeats the prompt messages first
        {"prompt": [msg("system", "Answer briefly."), msg("user", "Is water wet?")],
         "completion": [msg("system", "Answer briefly."), msg("user", "Is water wet?"), msg("assistant", "Maybe.")],
         "label": False},
        # prompt as a string, a single assistant message
        {"prompt": "Spell 'cat' backwards.", "completion": [msg("assistant", "tac")], "label": True},
        # no prompt: the whole conversation, its last assistant turn the completion
        {"completion": [msg("user", "Pick a number."), msg("assistant", "Seven."), msg("user", "Double it."),
                        msg("assistant", "Seventy.")], "label": False},
    ])
    rows = get_examples(jsonl_cfg(path, eval_path=path), "train")
    assert rows == [
        E("\n\nHuman: Largest planet?\n\nAssistant:", " Jupiter.", None, True),
        E("Answer briefly.\n\nHuman: Is water wet?\n\nAssistant:", " Maybe.", None, False),
        E("\n\nHuman: Spell 'cat' backwards.\n\nAssistant:", " tac", None, True),
        E("\n\nHuman: Pick a number.\n\nAssistant: Seven.\n\nHuman: Double it.\n\nAssistant:", " Seventy.", None,
          False),
    ]
    # rendered as the same conversation given as a pair would be
    pair = jsonl.parse_prompt_chosen_rejected({"prompt": [msg("user", "Largest planet?")],
                                               "chosen": [msg("assistant", "Jupiter.")],
                                               "rejected": [msg("assistant", "Mars.")]}, "x: row 1")
    assert (pair.prompt, pair.chosen) == (rows[0].prompt, rows[0].chosen)


def test_parquet_rows(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    path = tmp_path / "kto.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"],
                                "label": [True, False, True]}).to_parquet(str(path))
    assert get_examples(jsonl_cfg(path), "train") == [E("a", "x", None, True), E("b", "y", None, False)]


def test_which_rows_are_unpaired():
    assert is_unpaired_row({"prompt": "p", "completion": "c", "label": True})
    assert is_unpaired_row({"prompt": "p", "label": False})                # completion missing: an unpaired row's error
    assert is_unpaired_row({"prompt": "p", "completion": "c", "chosen": None, "rejected": None})   # Parquet nulls
    assert not is_unpaired_row({"prompt": "p", "chosen": "a", "rejected": "b", "label": True})
    assert not is_unpaired_row({"prompt": "p", "chosen": "a"})
    assert not is_unpaired_row({"prompt": "p"}) and not is_unpaired_row([1, 2])


GOOD = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "label": i % 2 == 0} for i in range(4)]


@pytest.mark.parametrize("bad,expected", [
    ({"prompt": "q", "completion": "a", "label": "yes"},
     'row 5: field "label" must be true or false (a JSON boolean), got a string "yes"'),
    ({"prompt": "q", "completion": "a", "label": 1},
     'row 5: field "label" must be true or false (a JSON boolean), got a number 1'),
    ({"prompt": "q", "completion": "a", "label": 0},
     'row 5: field "label" must be true or false (a JSON boolean), got a number 0'),
    ({"prompt": "q", "completion": "a", "label": None}, 'row 5: field "label" is null'),
    ({"prompt": "q", "label": True}, 'row 5: missing field "completion"'),
    ({"completion": "a", "label": True}, 'row 5: missing field "prompt"'),
    ({"prompt": "q", "completion": " ", "label": True}, 'row 5: field "completion" is empty'),
])
def test_bad_rows_are_one_line_errors_or_skipped(tmp_path, bad, expected):
    path = write_rows(tmp_path / "kto.jsonl", GOOD + [bad] + GOOD)
    with pytest.raises(ConfigError) as e:
        get_examples(jsonl_cfg(path), "train")
    message = one_line(e)
    assert message.startswith(f"{path}: {expected}"), message
    assert '"prompt", "completion" and "label"' in message      # what a row needs
    # data.skip_bad_rows=true: counted once (the file is read for both splits), the rest loads
    bad_rows = BadRows(skip=True)
    rows = get_examples(jsonl_cfg(path), "train", bad_rows) + get_examples(jsonl_cfg(path), "eval", bad_rows)
    assert bad_rows.count == 1 and bad_rows.first == message and len(rows) == 8


def test_missing_label_names_row_and_field(tmp_path):
    path = write_rows(tmp_path / "kto.jsonl", GOOD[:2] + [{"prompt": "q", "completion": "a"}] + GOOD)
    with pytest.raises(ConfigError) as e:
        get_examples(jsonl_cfg(path), "train")
    assert one_line(e) == (f'{path}: row 3: missing field "label"; an unpaired row needs "prompt", "completion" '
                           'and "label" (true: desirable, false: undesirable)')


@pytest.mark.parametrize("row,expected", [
    ({"prompt": "q", "completion": [msg("assistant", "a")], "label": "true"}, 'field "label" must be true or false'),
    ({"completion": [msg("assistant", "a")], "label": True},
     '"completion" holds only the assistant reply and there is no "prompt"'),
    ({"prompt": "q", "completion": [msg("user", "q")], "label": True}, 'field "completion" ends with a user message'),
    ({"prompt": "q", "completion": [], "label": True}, 'field "completion" is an empty message list'),
    ({"prompt": [msg("user", "q")], "completion": [msg("assistant", "a"), msg("assistant", "b")], "label": True},
     'field "completion" must hold one assistant reply after "prompt", found 2 messages'),
    ({"prompt": [msg("user", "q")], "completion": "a", "label": True}, 'field "prompt" must be a string, got a list'),
    ({"prompt": 3, "completion": [msg("assistant", "a")], "label": False}, 'field "prompt" must be a string or a list'),
])
def test_parse_unpaired_errors(row, expected):
    with pytest.raises(ConfigError) as e:
        jsonl.parse_row(row, "data/x.jsonl: row 7")
    message = one_line(e)
    assert message.startswith("data/x.jsonl: row 7: ") and expected in message, message


PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("skip", [False, True])
def test_a_file_mixing_pairs_and_unpaired_rows_is_refused(tmp_path, skip):
    path = write_rows(tmp_path / "mixed.jsonl", [PAIR, PAIR, GOOD[0], PAIR, GOOD[1]])
    with pytest.raises(ConfigError) as e:
        get_examples(jsonl_cfg(path), "train", BadRows(skip=skip))
    assert one_line(e) == (f'{path}: row 3: an unpaired row ("prompt", "completion", "label") after pairs '
                           '("prompt", "chosen", "rejected"); a file holds one kind of row: split it in two or '
                           "write every row in one shape (for loss=kto, data.unpaired=auto turns a file of pairs "
                           "into unpaired rows)")
    # the other way round; a bad row before it does not count as either kind
    path = write_rows(tmp_path / "mixed2.jsonl", [GOOD[0], "{not json", GOOD[1], PAIR, PAIR])
    with pytest.raises(ConfigError) as e:
        get_examples(jsonl_cfg(path), "train", BadRows(skip=True))
    assert one_line(e).startswith(f'{path}: row 4: a pair ("prompt", "chosen", "rejected") after unpaired rows '
                                  '("prompt", "completion", "label"); a file holds one kind of row')


def test_pairs_load_as_before(tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", [PAIR, {"prompt": "q", "chosen": "c", "rejected": "d", "label": 1}])
    assert get_examples(jsonl_cfg(path, n_eval=0), "train") == [E("p", "a", "b"), E("q", "c", "d")]
    assert get_examples(jsonl_cfg(path, n_eval=0), "train")[0].label is None


# ----------------------------------------------------------------------------
# Pairs split into unpaired rows.

def test_unpair_two_pairs_by_hand():
    pairs = [E("p1", "c1", "r1"), E("p2", "c2", "r2")]
    assert unpair(pairs) == [E("p1", "c1", None, True), E("p1", "r1", None, False),
                             E("p2", "c2", None, True), E("p2", "r2", None, False)]
    assert label_counts(unpair(pairs)) == (2, 2)
    # tokenized pairs split the same way (same field names)
    tokenized = [TokenizedExample([1], [5, 2], [6, 2]), TokenizedExample([3], [7, 2], [8, 2])]
    assert unpair(tokenized) == [TokenizedExample([1], [5, 2], None, label=True),
                                 TokenizedExample([1], [6, 2], None, label=False),
                                 TokenizedExample([3], [7, 2], None, label=True),
                                 TokenizedExample([3], [8, 2], None, label=False)]


def test_unpair_refuses_rows_that_are_not_pairs():
    with pytest.raises(ConfigError, match="row 2 is not a pair"):
        unpair([E("p", "c", "r"), E("p", "c")])
    with pytest.raises(ConfigError, match="row 1 is not a pair"):
        unpair([E("p", "c", None, True)])


# ----------------------------------------------------------------------------
# data.unpaired: every branch of unpaired_rows.

PAIRS = [E("p1", "c1", "r1"), E("p2", "c2", "r2"), E("p3", "c3", "r3")]
UNPAIRED = [E("p1", "c1", None, True), E("p2", "c2", None, False), E("p3", "c3", None, True)]


@pytest.mark.parametrize("mode", ["auto", "true", True, None])
def test_kto_splits_pairs(mode):
    rows, message = unpaired_rows(PAIRS, mode, loss_unpaired=True, loss_name="kto")
    assert rows == [E("p1", "c1", None, True), E("p1", "r1", None, False), E("p2", "c2", None, True),
                    E("p2", "r2", None, False), E("p3", "c3", None, True), E("p3", "r3", None, False)]
    shown = {True: "true", None: "auto"}.get(mode, mode)
    assert message == (f"data.unpaired={shown}: split 3 pairs into 6 unpaired rows for loss=kto: 3 desirable (each "
                       "chosen response, label true), 3 undesirable (each rejected one, label false)")


@pytest.mark.parametrize("mode", ["false", False])
def test_kto_with_pairs_and_unpaired_false_is_refused(mode):
    with pytest.raises(ConfigError) as e:
        unpaired_rows(PAIRS, mode, loss_unpaired=True, loss_name="kto")
    assert one_line(e) == ("loss=kto learns from unpaired rows but the data holds 3 pairs and data.unpaired=false; "
                           "set data.unpaired=auto (or true) to split each pair into its chosen (label true) and "
                           'rejected (label false) response, or pass a file of {"prompt", "completion", "label"} rows')


@pytest.mark.parametrize("mode", ["auto", "true", "false"])
def test_kto_keeps_unpaired_rows_and_counts_them(mode):
    rows, message = unpaired_rows(UNPAIRED, mode, loss_unpaired=True, loss_name="kto")
    assert rows == UNPAIRED
    assert message == "3 unpaired rows for loss=kto: 2 desirable (label true), 1 undesirable (label false)"


def test_one_kind_of_label_is_allowed_with_a_warning():
    only_good = [E("p1", "c1", None, True), E("p2", "c2", None, True)]
    rows, message = unpaired_rows(only_good, "auto", loss_unpaired=True)
    assert rows == only_good
    assert message == ("warning: all 2 unpaired rows for this loss are desirable (2 desirable (label true), "
                       "0 undesirable (label false)): the loss can only push these completions one way, with no "
                       "undesirable example to contrast them with; add rows labelled false if you have them")
    _, message = unpaired_rows([E("p", "c", None, False)], "auto", loss_unpaired=True)
    assert message.startswith("warning: all 1 unpaired rows for this loss are undesirable (0 desirable")
    assert message.endswith("add rows labelled true if you have them")


@pytest.mark.parametrize("mode", ["auto", "true", "false"])
def test_a_pair_loss_refuses_unpaired_rows(mode):
    with pytest.raises(ConfigError) as e:
        unpaired_rows(UNPAIRED, mode, loss_unpaired=False, loss_name="dpo")
    assert one_line(e) == ('loss=dpo needs pairs ("chosen"/"rejected") but the data holds 3 unpaired rows '
                           '("completion" with a "label"); use loss=kto, which learns from unpaired rows, or a file '
                           "of pairs")


@pytest.mark.parametrize("mode", ["true", True])
def test_unpaired_true_needs_an_unpaired_loss(mode):
    with pytest.raises(ConfigError) as e:
        unpaired_rows(PAIRS, mode, loss_unpaired=False, loss_name="sft")
    assert one_line(e) == ("data.unpaired=true only applies to a loss that learns from unpaired data, such as "
                           "loss=kto; loss=sft trains on the rows as they are: use data.unpaired=auto or false")


@pytest.mark.parametrize("mode", ["auto", "false", False])
def test_a_pair_loss_gets_pairs_as_they_are(mode):
    assert unpaired_rows(PAIRS, mode, loss_unpaired=False) == (PAIRS, None)
    sft = [E("p", "c")]
    assert unpaired_rows(sft, mode, loss_unpaired=False) == (sft, None)


def test_unpaired_rows_refusals_without_a_loss_name():
    with pytest.raises(ConfigError) as e:
        unpaired_rows(PAIRS + UNPAIRED, "auto", loss_unpaired=True)
    assert one_line(e) == "3 of 6 rows are unpaired (they have a label) and the others are not; give one kind of row"
    with pytest.raises(ConfigError) as e:
        unpaired_rows([E("p", "c"), E("q", "d")], "auto", loss_unpaired=True)
    assert one_line(e).startswith("this loss learns from unpaired rows but 2 of 2 rows have neither a rejected "
                                  "response nor a label")
    with pytest.raises(ConfigError) as e:
        unpaired_rows(PAIRS, "maybe", loss_unpaired=True)
    assert one_line(e) == "data.unpaired=maybe is not one of auto, true, false"
    assert unpaired_rows([], "auto", loss_unpaired=True) == ([], None)


def test_unpaired_mode():
    assert UNPAIRED_MODES == ("auto", "true", "false")
    assert [unpaired_mode(v) for v in ("auto", "true", "false", True, False, None)] == [
        "auto", "true", "false", "true", "false", "auto"]
    for value in ("maybe", "yes", 1, "True"):
        with pytest.raises(ConfigError, match=f"data.unpaired={value} is not one of auto, true, false"):
            unpaired_mode(value)


# ----------------------------------------------------------------------------
# Tokenization and the checks on data that cannot teach.

def run_cfg(chat_template=False):
    return OmegaConf.create({"max_length": 32, "max_prompt_length": 16, "data": {"add_bos": "auto"},
                             "dataset": {"truncation_mode": "keep_start", "chat_template": chat_template}})


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_label_survives_tokenization():
    tok = byte_tokenizer()
    assert ids(tok, "ab=") == [67, 68, 31] and tok.eos_token_id == 2
    rows = [E("ab=", "ba", None, True), E("ab=", "aa", None, False), E("ab=", "ba", "aa")]
    got = tokenize_rows(rows, tok, run_cfg())
    # an unpaired row: prompt, then completion + EOS, as an SFT row; the label kept
    assert got[0] == TokenizedExample([67, 68, 31], [68, 67, 2], None, label=True)
    assert got[1] == TokenizedExample([67, 68, 31], [67, 67, 2], None, label=False)
    assert got[2] == TokenizedExample([67, 68, 31], [68, 67, 2], [67, 67, 2]) and got[2].label is None
    assert tokenize_example(E("ab=", "ba", None, False), tok, 32, 16).label is False
    # truncation: the prompt first, then the completion, as for an SFT row
    long = tokenize_example(E("p" * 20, "c" * 30, None, True), tok, 24, 8)
    assert long == TokenizedExample(ids(tok, "p" * 8), ids(tok, "c" * 16), None, label=True)


def test_chat_template_keeps_the_label():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    cfg = run_cfg(chat_template=True)
    assert apply_chat_template([E("hi", "yo", None, False)], tok, cfg.dataset) == [
        E("[user]hi[assistant]", "yo", None, False)]
    got = tokenize_rows([E("hi", "yo", None, True)], tok, cfg)
    assert got == [TokenizedExample(ids(tok, "[user]hi[assistant]"), ids(tok, "yo") + [2], None, label=True)]


def test_identical_pair_check_and_overlap_warning_take_unpaired_rows():
    rows = [TokenizedExample([1], [5, 2], None, label=True), TokenizedExample([1], [5, 2], None, label=False)]
    assert drop_identical_pairs(rows, rows, max_length=32) == (rows, None)
    train = [E("a", "1", None, True), E("b", "2", None, False)]
    eval_ = [E("a", "1", None, True),      # the same row
             E("b", "2", None, True),      # the same prompt and completion, the other label
             E("z", "1", None, True)]      # new
    assert split_overlap_warning(train, eval_) == (
        "warning: 2 of 3 eval rows share their prompt with a train row (1 of them the same prompt, completion and "
        "label): eval on them measures recall of training data, not generalization; deduplicate the file or pass "
        "dataset.eval_path=<rows with other prompts>")
    assert split_overlap_warning(train, [E("z", "1", None, False)]) is None


# ----------------------------------------------------------------------------
# The config key.

def test_config_default_and_check(tmp_path):
    data = OmegaConf.load(ROOT / "config" / "config.yaml").data
    assert data.unpaired == "auto"
    for value in ("auto", "true", "false"):
        config_checks.check_command_line([f"data.unpaired={value}", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        config_checks.check_command_line(["data.unpaired=maybe", f"run_dir={tmp_path}"])
    assert one_line(e) == "data.unpaired=maybe is not one of auto, true, false"
    with pytest.raises(ConfigError, match="data.unpaired=3 should be"):
        config_checks.check_command_line(["data.unpaired=3", f"run_dir={tmp_path}"])
