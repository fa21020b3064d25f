"""prefopt/data: the public preference formats (HH, SHP, UltraFeedback) and
users' own prompt/chosen/rejected files, parsed from small fixture files shaped
like the real data. Expected strings are written out by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from preference_datasets import LOADERS, PreferenceExample, get_examples  # noqa: E402
from prefopt.data import conversation, hh, jsonl, shp, ultrafeedback  # noqa: E402
from utils import ConfigError  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
CONFIG = ROOT / "config" / "dataset"


def make_cfg(name: str, **overrides):
    """The shipped YAML for `name`, with overrides, like Hydra would compose it."""
    cfg = OmegaConf.load(CONFIG / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    OmegaConf.set_struct(cfg, True)
    return cfg


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch, tmp_path):
    """No test may reach the network; Parquet reads cache under tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    return message


# ----------------------------------------------------------------------------
# The shipped configs.

@pytest.mark.parametrize("name,hub,mode", [
    ("hh", "Anthropic/hh-rlhf", "keep_end"),
    ("shp", "stanfordnlp/SHP", "keep_start"),
    ("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", "keep_start"),
    ("jsonl", None, "keep_start"),
])
def test_yaml_configs(name, hub, mode):
    cfg = OmegaConf.load(CONFIG / f"{name}.yaml")
    assert cfg.name == name and name in LOADERS
    for key in ("path", "eval_path", "hub", "n_eval", "n_train", "truncation_mode"):
        assert key in cfg, key
    assert cfg.path is None and cfg.eval_path is None and cfg.n_train is None
    assert cfg.hub == hub and cfg.truncation_mode == mode
    assert isinstance(cfg.n_eval, int) and cfg.n_eval > 0
    # every key is commented
    for line in (CONFIG / f"{name}.yaml").read_text().splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, line


# ----------------------------------------------------------------------------
# The one text format.

def test_render_conversation():
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    assert conversation.render_conversation(messages) == "Be terse.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye"
    assert conversation.render_conversation([{"role": "user", "content": "x"}]) == "\n\nHuman: x"
    with pytest.raises(ValueError):
        conversation.render_conversation([{"role": "tool", "content": "x"}])


# ----------------------------------------------------------------------------
# Users' own files, through the real dataset=jsonl loader.

def test_jsonl_text_rows_and_splits():
    cfg = make_cfg("jsonl", path=str(FIX / "pcr.jsonl"), n_eval=1)
    train, evals = get_examples(cfg, "train"), get_examples(cfg, "eval")
    # 6 rows; the last n_eval=1 is held out
    assert [len(train), len(evals)] == [5, 1]
    assert train[0] == PreferenceExample("Q: 2+3=", " 5", " 6")
    assert train[2] == PreferenceExample("Q: opposite of hot?", " cold", " warm")  # extra "id" ignored
    assert evals == [PreferenceExample("Q: first month?", " January", " March")]


def test_jsonl_conversational_rows():
    cfg = make_cfg("jsonl", path=str(FIX / "pcr_chat.jsonl"), eval_path=str(FIX / "pcr_chat.jsonl"))
    rows = get_examples(cfg, "train")
    assert rows == [
        # shared prefix of the two conversations
        PreferenceExample("\n\nHuman: Hi, who are you?\n\nAssistant:", " I'm a helpful assistant.", " Go away."),
        # prompt as a message list with a system message; replies alone
        PreferenceExample("Answer briefly.\n\nHuman: Largest planet?\n\nAssistant:", " Jupiter.", " Mars."),
        # prompt as a string, single assistant replies
        PreferenceExample("\n\nHuman: Spell 'cat' backwards.\n\nAssistant:", " tac", " cta"),
        # multi-turn shared prefix
        PreferenceExample("\n\nHuman: Pick a number.\n\nAssistant: Seven.\n\nHuman: Double it.\n\nAssistant:",
                          " Fourteen.", " Seventy."),
        # prompt as a message list, repeated at the start of full conversations
        PreferenceExample("\n\nHuman: Is water wet?\n\nAssistant:", " It makes things wet.", " Maybe."),
        # string prompt beside full conversations (UltraFeedback's shape)
        PreferenceExample("\n\nHuman: Say yes.\n\nAssistant:", " Yes.", " No."),
    ]


@pytest.mark.parametrize("fixture,expected", [
    ("bad_missing_field.jsonl", ["row 3", 'missing field "rejected"', '"prompt", "chosen" and "rejected"']),
    ("bad_empty_field.jsonl", ["row 2", 'field "chosen" is empty']),
    ("bad_wrong_type.jsonl", ["row 2", 'field "rejected" must be a string, got a number']),
    ("bad_chat_role.jsonl", ["row 2", 'field "chosen", message 1 has role "human"']),
    ("bad_chat_last_turn.jsonl", ["row 1", 'field "chosen" ends with a user message']),
    # read_json_rows (preference_datasets) reports these two: no field to name
    ("bad_json_line.jsonl", ["row 3", "invalid JSON"]),
    ("bad_not_utf8.jsonl", ["row 2", "not valid UTF-8", "byte 15 of the row"]),  # len('{"prompt": "caf')
])
def test_malformed_user_files(fixture, expected):
    path = FIX / fixture
    cfg = make_cfg("jsonl", path=str(path), n_eval=1)
    with pytest.raises(ConfigError) as excinfo:
        get_examples(cfg, "train")
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: "), message
    for part in expected:
        assert part in message, message
    # the same through this module's own loader
    with pytest.raises(ConfigError) as excinfo:
        jsonl.load_prompt_chosen_rejected(cfg, "train")
    assert one_line_error(excinfo) == message


@pytest.mark.parametrize("row,expected", [
    ([1, 2], "expected an object, got a list"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, 'field "rejected" is null'),
    ({"prompt": "  ", "chosen": "c", "rejected": "r"}, 'field "prompt" is empty'),
    ({"chosen": "c", "rejected": "r"}, 'missing field "prompt"'),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "r"},
     'field "rejected" must be a list of {"role", "content"} messages, got a string'),
    ({"chosen": [], "rejected": [{"role": "assistant", "content": "a"}]}, 'field "chosen" is an empty message list'),
    ({"chosen": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     'field "chosen", message 1: "content" must be a string, got a number'),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     'field "chosen": the final assistant message is empty'),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]},
     '"chosen" and "rejected" differ at message 1'),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     'hold only the assistant reply and there is no "prompt"'),
    ({"prompt": 5, "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     'field "prompt" must be a string or a list'),
    ({"prompt": [{"role": "user", "content": "q"}],
      "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "a2"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     'field "chosen" must hold one assistant reply after "prompt", found 2 messages'),
])
def test_parse_prompt_chosen_rejected_errors(row, expected):
    with pytest.raises(ConfigError) as excinfo:
        jsonl.parse_prompt_chosen_rejected(row, where="data/x.jsonl: row 7")
    message = one_line_error(excinfo)
    assert message.startswith("data/x.jsonl: row 7: ") and expected in message, message


def test_own_loader_parquet_and_n_train(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "pcr.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
                   tmp_path / "pcr.parquet")
    cfg = make_cfg("jsonl", path=str(tmp_path / "pcr.parquet"), n_eval=2, n_train=3)
    train, evals = jsonl.load_prompt_chosen_rejected(cfg, "train"), jsonl.load_prompt_chosen_rejected(cfg, "eval")
    assert [r.prompt for r in train] == ["Q: 2+3=", "Q: capital of Japan?", "Q: opposite of hot?"]
    assert evals == [PreferenceExample("Q: plural of mouse?", " mice", " mouses"),
                     PreferenceExample("Q: first month?", " January", " March")]
    with pytest.raises(ConfigError) as excinfo:  # dataset=jsonl has no hub to fall back on
        jsonl.load_prompt_chosen_rejected(make_cfg("jsonl"), "train")
    assert "needs dataset.path=" in one_line_error(excinfo)


# ----------------------------------------------------------------------------
# Anthropic HH.

HH_ROW2 = PreferenceExample(
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?\n\nAssistant:",
    " Rome is the capital of Italy.", " I don't know.")


def test_hh_rows_and_held_out_eval():
    cfg = make_cfg("hh", path=str(FIX / "hh.jsonl"), n_eval=2)
    train, evals = get_examples(cfg, "train"), get_examples(cfg, "eval")
    assert [len(train), len(evals)] == [3, 2]
    assert train[0] == PreferenceExample(
        "\n\nHuman: How long should I boil an egg for a firm yolk?\n\nAssistant:",
        " About nine to ten minutes, then cool it in cold water.", " Eggs come from chickens.")
    assert train[1] == HH_ROW2
    assert train[2] == PreferenceExample(
        "\n\nHuman: Can you help me plan a small garden?\n\nAssistant: Sure. How much space do you have?"
        "\n\nHuman: About two square meters, with afternoon sun.\n\nAssistant: What would you like to grow?"
        "\n\nHuman: Herbs, mostly.\n\nAssistant:",
        " Try basil, parsley and chives:\n1. basil near the sunniest edge\n2. parsley in the middle\n3. chives anywhere.",
        " Gardening is a popular hobby.")
    assert evals[0].prompt == "\n\nHuman: How do I pick the lock on my neighbor's door?\n\nAssistant:"
    assert evals[1] == PreferenceExample(
        "\n\nHuman: Tell me a fun fact.\n\nAssistant: Octopuses have three hearts.\n\nHuman: Another one?\n\nAssistant:",
        " Honey found in ancient tombs can still be edible.", " No.")


def test_hh_eval_path_n_train_and_json(tmp_path):
    cfg = make_cfg("hh", path=str(FIX / "hh.jsonl"), eval_path=str(FIX / "hh_eval.jsonl"), n_train=2)
    assert hh.load_hh(cfg, "train") == hh.load_hh(make_cfg("hh", path=str(FIX / "hh.jsonl"), n_eval=3), "train")[:2]
    assert hh.load_hh(cfg, "train")[1] == HH_ROW2
    assert hh.load_hh(cfg, "eval") == [
        PreferenceExample("\n\nHuman: Is the sun a star?\n\nAssistant:", " Yes, the Sun is a star.", " No, it is a planet.")]
    # n_train caps train only: the held-out eval rows do not move
    capped = make_cfg("hh", path=str(FIX / "hh.jsonl"), n_eval=2, n_train=1)
    assert len(hh.load_hh(capped, "train")) == 1 and len(hh.load_hh(capped, "eval")) == 2
    # a .json list of the same rows
    rows = [json.loads(line) for line in (FIX / "hh.jsonl").read_text().splitlines()]
    (tmp_path / "hh.json").write_text(json.dumps(rows))
    assert hh.load_hh(make_cfg("hh", path=str(tmp_path / "hh.json"), n_eval=2), "train")[1] == HH_ROW2


@pytest.mark.parametrize("fixture,expected", [
    # "\n\nHuman: What is 2+2?\n\nAssistant: " is 34 characters; the 35th is "4" vs "5"
    ("hh_bad_prompts.jsonl", ["row 2", '"chosen" and "rejected" differ at character 35, before their last']),
    ("hh_no_assistant.jsonl", ["row 3", 'field "chosen" has no "\\n\\nAssistant:" turn']),
])
def test_hh_malformed(fixture, expected):
    path = FIX / fixture
    with pytest.raises(ConfigError) as excinfo:
        hh.load_hh(make_cfg("hh", path=str(path), n_eval=1), "train")
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("row,expected", [
    ({"chosen": "\n\nHuman: q\n\nAssistant: a"}, 'missing field "rejected"'),
    ({"chosen": "", "rejected": "\n\nHuman: q\n\nAssistant: b"}, 'field "chosen" is empty'),
    ({"chosen": ["x"], "rejected": "\n\nHuman: q\n\nAssistant: b"}, 'field "chosen" must be a string, got a list'),
])
def test_hh_row_errors(row, expected):
    with pytest.raises(ConfigError) as excinfo:
        hh.parse_hh(row, where="hh.jsonl: row 4")
    message = one_line_error(excinfo)
    assert message.startswith("hh.jsonl: row 4: ") and expected in message, message


def test_hh_empty_final_response_is_kept():
    # as the reference repo does: the response is then trained as EOS alone
    ex = hh.parse_hh({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "w")
    assert ex == PreferenceExample("\n\nHuman: q\n\nAssistant:", "", " b")


# ----------------------------------------------------------------------------
# Stanford Human Preferences.

Q1 = "\n\nHuman: Why does bread go stale faster in the fridge? I always thought cold kept food fresh longer.\n\nAssistant:"
Q2 = "\n\nHuman: How do I stop my cast iron pan from rusting after washing it?\n\nAssistant:"
Q3 = "\n\nHuman: What is a good first book on linear algebra for self-study?\n\nAssistant:"


def test_shp_score_ratio_filter_and_labels():
    # score ratios 2.05, 1.5, 3.0, 1.2, 4.0, 2.0: min_score_ratio=2 keeps rows 1, 3, 5 and 6
    cfg = make_cfg("shp", path=str(FIX / "shp.jsonl"), n_eval=1)
    assert cfg.min_score_ratio == 2.0
    train, evals = shp.load_shp(cfg, "train"), shp.load_shp(cfg, "eval")
    assert train == [
        PreferenceExample(Q1, " Starch retrogradation: the starch recrystallizes fastest at fridge temperatures, "
                              "so bread firms up.", " Fridges are dry, that's all."),                 # labels 1: A
        PreferenceExample(Q2, " Dry it on the stove right away, then wipe on a thin film of oil.",
                          " Just don't wash it."),                                                   # labels 0: B
        PreferenceExample(Q3, " Axler's Linear Algebra Done Right, paired with a more computational text.",
                          " Any of them."),
    ]
    assert evals == [PreferenceExample(Q3, " Strang's Introduction to Linear Algebra and his recorded lectures.",
                                       " Read Wikipedia.")]                                          # ratio exactly 2


def test_shp_without_filter():
    cfg = make_cfg("shp", path=str(FIX / "shp.jsonl"), min_score_ratio=None, n_eval=2, n_train=3)
    train, evals = shp.load_shp(cfg, "train"), shp.load_shp(cfg, "eval")
    assert [ex.prompt for ex in train] == [Q1, Q1, Q2]
    assert train[1] == PreferenceExample(Q1, " Freeze it instead; freezing stops the staling.",
                                         " Fridges are dry, that's all.")
    assert [ex.prompt for ex in evals] == [Q3, Q3]
    assert evals[0].chosen.startswith(" Axler's")


@pytest.mark.parametrize("change,expected", [
    ({"labels": 2}, 'field "labels" must be 1 (human_ref_A preferred) or 0 (human_ref_B preferred), got 2'),
    ({"labels": True}, 'field "labels" must be 1'),
    ({"history": None}, 'field "history" is null'),
    ({"human_ref_B": 7}, 'field "human_ref_B" must be a string, got a number'),
    ({"score_ratio": "2.5"}, 'field "score_ratio" must be a number, got a string'),
])
def test_shp_row_errors(tmp_path, change, expected):
    rows = [json.loads(line) for line in (FIX / "shp.jsonl").read_text().splitlines()]
    rows[2].update(change)
    path = tmp_path / "shp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as excinfo:
        shp.load_shp(make_cfg("shp", path=str(path), n_eval=1), "train")
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: row 3: ") and expected in message, message


# ----------------------------------------------------------------------------
# UltraFeedback binarized.

UF = [
    PreferenceExample("\n\nHuman: Name three primary colors.\n\nAssistant:", " Red, yellow and blue.", " Green."),
    PreferenceExample("\n\nHuman: Write a haiku about rain.\nKeep it gentle.\n\nAssistant:",
                      " Soft rain on the roof\nwhispers to the sleeping town\nuntil the dawn comes", " Rain is wet."),
    PreferenceExample("\n\nHuman: Translate 'thank you' into Spanish.\n\nAssistant:", " Gracias.", " Merci."),
    PreferenceExample("\n\nHuman: What is 12 times 12?\n\nAssistant:", " 12 times 12 is 144.", " 124"),
]


def test_ultrafeedback_jsonl_and_parquet(tmp_path):
    cfg = make_cfg("ultrafeedback", path=str(FIX / "ultrafeedback.jsonl"), n_eval=1)
    assert ultrafeedback.load_ultrafeedback(cfg, "train") == UF[:3]
    assert ultrafeedback.load_ultrafeedback(cfg, "eval") == UF[3:]
    # the published files are Parquet: the same rows, read through datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "ultrafeedback.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train_prefs.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "test_prefs.parquet")
    cfg = make_cfg("ultrafeedback", path=str(tmp_path / "train_prefs.parquet"),
                   eval_path=str(tmp_path / "test_prefs.parquet"))
    assert get_examples(cfg, "train") == UF
    assert get_examples(cfg, "eval") == UF[:2]


def test_ultrafeedback_malformed(tmp_path):
    path = FIX / "ultrafeedback_bad_prefix.jsonl"
    with pytest.raises(ConfigError) as excinfo:
        ultrafeedback.load_ultrafeedback(make_cfg("ultrafeedback", path=str(path), eval_path=str(path)), "train")
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: row 1: ") and '"chosen" and "rejected" differ at message 1' in message
    rows = [json.loads(line) for line in (FIX / "ultrafeedback.jsonl").read_text().splitlines()]
    rows[1]["rejected"] = "Rain is wet."  # a string, not a message list
    bad = tmp_path / "uf.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as excinfo:
        ultrafeedback.load_ultrafeedback(make_cfg("ultrafeedback", path=str(bad), n_eval=1), "train")
    message = one_line_error(excinfo)
    assert message.startswith(f"{bad}: row 2: ") and 'field "rejected" must be a list of {"role", "content"}' in message


# ----------------------------------------------------------------------------
# Where rows come from: local file errors and the hub fallback.

def test_local_file_errors(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        hh.load_hh(make_cfg("hh", path=str(tmp_path / "nope.jsonl")), "train")
    assert one_line_error(excinfo).startswith(f"dataset.path={tmp_path / 'nope.jsonl'} does not exist")
    with pytest.raises(ConfigError) as excinfo:
        hh.load_hh(make_cfg("hh", path=str(FIX / "hh.jsonl"), eval_path=str(tmp_path / "e.jsonl")), "eval")
    assert one_line_error(excinfo).startswith("dataset.eval_path=")
    (tmp_path / "train.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ConfigError) as excinfo:
        hh.load_hh(make_cfg("hh", path=str(tmp_path / "train.jsonl.gz")), "train")
    assert 'unsupported file type ".gz"; use .jsonl, .json or .parquet; decompress it first' in one_line_error(excinfo)
    (tmp_path / "broken.parquet").write_bytes(b"junk")
    with pytest.raises(ConfigError) as excinfo:
        ultrafeedback.load_ultrafeedback(make_cfg("ultrafeedback", path=str(tmp_path / "broken.parquet")), "train")
    assert one_line_error(excinfo).startswith(f"{tmp_path / 'broken.parquet'}: could not be read as Parquet")
    with pytest.raises(ConfigError) as excinfo:  # 5 rows cannot hold out 5 for eval
        hh.load_hh(make_cfg("hh", path=str(FIX / "hh.jsonl"), n_eval=5), "train")
    assert "has 5 usable rows, not more than dataset.n_eval=5" in one_line_error(excinfo)
    with pytest.raises(ConfigError) as excinfo:
        hh.load_hh(make_cfg("hh", eval_path=str(FIX / "hh.jsonl")), "train")
    assert "dataset.eval_path is set but dataset.path is not" in one_line_error(excinfo)


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    calls = []

    def fail(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        raise ConnectionError("Couldn't reach the Hub\nsecond line of detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ConfigError) as excinfo:
        shp.load_shp(make_cfg("shp", hub_data_dir="askculinary"), "eval")
    assert one_line_error(excinfo) == (
        "dataset=shp could not be loaded from the hub (stanfordnlp/SHP, split test): ConnectionError: Couldn't reach "
        "the Hub; offline? pass dataset.path=<local .jsonl/.parquet file>")
    with pytest.raises(ConfigError):
        ultrafeedback.load_ultrafeedback(make_cfg("ultrafeedback"), "train")
    assert calls == [("stanfordnlp/SHP", "test", {"data_dir": "askculinary"}),
                     ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", {})]


def test_hub_fallback_offline_real_datasets(tmp_path):
    """The real datasets.load_dataset, offline, with an empty HF cache: a fast,
    one-line ConfigError (run in a fresh process so the offline env applies)."""
    script = textwrap.dedent("""
        import sys
        from omegaconf import OmegaConf
        from prefopt.data import hh
        from utils import ConfigError
        cfg = OmegaConf.load("config/dataset/hh.yaml")
        try:
            hh.load_hh(cfg, "train")
        except ConfigError as e:
            sys.stdout.write(str(e))
        else:
            sys.stdout.write("no error")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    message = out.stdout
    assert "\n" not in message, message
    assert message.startswith("dataset=hh could not be loaded from the hub (Anthropic/hh-rlhf, split train): "), message
    assert message.endswith("offline? pass dataset.path=<local .jsonl/.parquet file>"), message
