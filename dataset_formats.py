"""Public preference-data formats, parsed into `PreferenceExample` rows.

Every loader here returns text in ONE neutral format, the HH transcript style
(written only by `render_conversation`):

    {system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}\\n\\nHuman: ...

A prompt always ends with "\\n\\nAssistant:" and each response starts with a
space, so prompt + response is exactly the rendered conversation, as in HH
itself (the reference DPO repo trains on HH text as it is).

  parse_prompt_chosen_rejected  one row of a user's own file (dataset=jsonl)
  load_hh                       Anthropic/hh-rlhf
  load_shp                      stanfordnlp/SHP
  load_ultrafeedback            HuggingFaceH4/ultrafeedback_binarized

Where rows come from (config/dataset/*.yaml): `dataset.path`, a local .jsonl,
.json or .parquet file, with `dataset.eval_path` for the eval split or else the
last `n_eval` rows of `path` held out; if `path` is null, the hub dataset
`dataset.hub` (its `hub_train_split` / `hub_eval_split`). `n_train` caps the
train rows. Errors are `ConfigError`s naming the file, the row and the field.

Strictness: every text must be valid Unicode (no lone UTF-16 surrogate from
a JSON escape); a user's own rows must have a non-empty prompt and non-empty
responses. In the public formats the source fields must be present, of the
right type and non-empty, but a response that is empty once the prompt is cut
off (an HH transcript ending in "Assistant:") is kept, as the reference repo
keeps it: that response is then trained as EOS alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from preference_datasets import BadRows, PreferenceExample, read_json_rows
from utils import ConfigError

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")

_PCR_HINT = 'every row needs "prompt", "chosen" and "rejected"'
_HH_HINT = 'every HH row needs "chosen" and "rejected" transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")'
_SHP_HINT = 'every SHP row needs "history", "human_ref_A", "human_ref_B" and "labels"'
_UF_HINT = 'every UltraFeedback row needs "chosen" and "rejected" lists of {"content", "role"} messages'


# ----------------------------------------------------------------------------
# The one text format.

def render_conversation(messages: Sequence[Mapping[str, str]]) -> str:
    """Render chat messages as HH-style text: each user turn as
    "\\n\\nHuman: {content}", each assistant turn as "\\n\\nAssistant: {content}",
    a system message as a plain paragraph (the first one with no blank line
    before it). Contents are kept as they are."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(content if i == 0 else "\n\n" + content)
        elif role == "user":
            parts.append(f"{HUMAN} {content}")
        elif role == "assistant":
            parts.append(f"{ASSISTANT} {content}")
        else:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return "".join(parts)


def _prompt_text(prompt_messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for the assistant's next turn: ends with "\\n\\nAssistant:"."""
    return render_conversation(prompt_messages) + ASSISTANT


def _response_text(content: str) -> str:
    return " " + content


# ----------------------------------------------------------------------------
# Field checks. Messages must stay on one line: values are shown JSON-escaped.

def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _show(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_row(row, where: str, hint: str) -> Mapping:
    if not isinstance(row, Mapping):
        raise ConfigError(f"{where}: expected an object, got {_json_type(row)}; {hint}")
    return row


def _field(row: Mapping, name: str, where: str, hint: str):
    if name not in row:
        raise ConfigError(f'{where}: missing field "{name}"; {hint}')
    if row[name] is None:
        raise ConfigError(f'{where}: field "{name}" is null; {hint}')
    return row[name]


def _unicode(value: str, what: str) -> str:
    """`value` if it is valid Unicode text. JSON's "\\ud800" escape gives a
    lone UTF-16 surrogate, which json.loads accepts but no tokenizer can encode
    (a TypeError deep inside `tokenizers`); `what` starts the error message."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        raise ConfigError(f"{what} holds a lone UTF-16 surrogate (\\u{code:04x} at character {e.start + 1}), which is "
                          "not text; fix that JSON escape (surrogates come in high-low pairs) or drop the row") from None
    return value


def _text(row: Mapping, name: str, where: str, hint: str) -> str:
    value = _field(row, name, where, hint)
    if not isinstance(value, str):
        raise ConfigError(f'{where}: field "{name}" must be a string, got {_json_type(value)}; {hint}')
    if not value.strip():
        raise ConfigError(f'{where}: field "{name}" is empty; {hint}')
    return _unicode(value, f'{where}: field "{name}"')


def _messages(value, name: str, where: str, hint: str) -> list[dict[str, str]]:
    """A validated message list, reduced to {"role", "content"} dicts."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f'{where}: field "{name}" must be a list of {{"role", "content"}} messages, '
                          f"got {_json_type(value)}; {hint}")
    if not value:
        raise ConfigError(f'{where}: field "{name}" is an empty message list; {hint}')
    out = []
    for i, message in enumerate(value, start=1):
        at = f'{where}: field "{name}", message {i}'
        if not isinstance(message, Mapping):
            raise ConfigError(f'{at} must be an object {{"role", "content"}}, got {_json_type(message)}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(f'{at} has role {_show(role)}; use "system", "user" or "assistant"')
        if not isinstance(content, str):
            raise ConfigError(f'{at}: "content" must be a string, got {_json_type(content)}')
        out.append({"role": role, "content": _unicode(content, f'{at}: "content"')})
    return out


def _last_turn(messages: list[dict[str, str]], name: str, where: str,
               require_response: bool) -> tuple[list[dict[str, str]], str]:
    """(the messages before the final assistant turn, that turn's content)."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise ConfigError(f'{where}: field "{name}" ends with a {last["role"]} message; '
                          "its last message must be the assistant's response")
    if require_response and not last["content"].strip():
        raise ConfigError(f'{where}: field "{name}": the final assistant message is empty')
    return messages[:-1], last["content"]


def _first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _conversation_pair(chosen: list[dict[str, str]], rejected: list[dict[str, str]], where: str,
                       require_response: bool) -> PreferenceExample:
    """Two full conversations that share everything but the final assistant
    turn: the shared part is the prompt, the final turns the responses."""
    chosen_prompt, chosen_reply = _last_turn(chosen, "chosen", where, require_response)
    rejected_prompt, rejected_reply = _last_turn(rejected, "rejected", where, require_response)
    if chosen_prompt != rejected_prompt:
        k = _first_difference(chosen_prompt, rejected_prompt) + 1
        raise ConfigError(f'{where}: "chosen" and "rejected" differ at message {k}, before their last turn; '
                          'both must continue the same conversation (or give the shared part as "prompt")')
    if not chosen_prompt:
        raise ConfigError(f'{where}: "chosen" and "rejected" hold only the assistant reply and there is no "prompt"; '
                          'add "prompt" or the user turn before each reply')
    return PreferenceExample(_prompt_text(chosen_prompt), _response_text(chosen_reply), _response_text(rejected_reply))


# ----------------------------------------------------------------------------
# Row parsers: one row (a dict) -> PreferenceExample, or a one-line ConfigError.

def parse_prompt_chosen_rejected(row: dict, where: str) -> PreferenceExample:
    """One row of a user's file. Two shapes:

    - text: {"prompt": str, "chosen": str, "rejected": str}, used as they are;
    - conversational: "chosen"/"rejected" are lists of {"role", "content"}
      messages, rendered with `render_conversation`. The prompt is
        * "prompt" as a message list (the responses then hold the reply alone,
          or the whole conversation starting with those prompt messages),
        * "prompt" as a string, taken as one user turn, when each response is
          a single assistant message,
        * otherwise the shared part of the two conversations, whose final
          assistant turns are the responses (a string "prompt" beside full
          conversations, as UltraFeedback has, is then not used).

    `where` ("file: row N") starts every error message."""
    row = _check_row(row, where, _PCR_HINT)
    for name in ("chosen", "rejected"):
        _field(row, name, where, _PCR_HINT)
    if isinstance(row["chosen"], (list, tuple)) or isinstance(row["rejected"], (list, tuple)):
        return _parse_conversational(row, where)
    prompt = _text(row, "prompt", where, _PCR_HINT)
    chosen = _text(row, "chosen", where, _PCR_HINT + ' ("chosen"/"rejected" may also be lists of {"role", "content"} messages)')
    rejected = _text(row, "rejected", where, _PCR_HINT + ' ("chosen"/"rejected" may also be lists of {"role", "content"} messages)')
    return PreferenceExample(prompt, chosen, rejected)


def _parse_conversational(row: Mapping, where: str) -> PreferenceExample:
    hint = '"chosen" and "rejected" must both be message lists here'
    chosen = _messages(row["chosen"], "chosen", where, hint)
    rejected = _messages(row["rejected"], "rejected", where, hint)
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list, tuple)):
        raise ConfigError(f'{where}: field "prompt" must be a string or a list of {{"role", "content"}} messages, '
                          f"got {_json_type(prompt)}")
    single = len(chosen) == 1 and len(rejected) == 1
    if isinstance(prompt, (list, tuple)):
        prompt_messages = _messages(prompt, "prompt", where, 'give "prompt" as a string or a non-empty message list')
        n = len(prompt_messages)
        replies = []
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) > n and messages[:n] == prompt_messages:
                messages = messages[n:]  # the whole conversation was given: drop the repeated prompt
            if len(messages) != 1:
                raise ConfigError(f'{where}: field "{name}" must hold one assistant reply after "prompt", '
                                  f"found {len(messages)} messages")
            replies.append(_last_turn(messages, name, where, require_response=True)[1])
        return PreferenceExample(_prompt_text(prompt_messages), _response_text(replies[0]), _response_text(replies[1]))
    if isinstance(prompt, str) and single:
        prompt = _text(row, "prompt", where, _PCR_HINT)
        replies = [_last_turn(m, name, where, require_response=True)[1]
                   for name, m in (("chosen", chosen), ("rejected", rejected))]
        return PreferenceExample(_prompt_text([{"role": "user", "content": prompt}]),
                                 _response_text(replies[0]), _response_text(replies[1]))
    return _conversation_pair(chosen, rejected, where, require_response=True)


def parse_hh(row: dict, where: str) -> PreferenceExample:
    """One Anthropic HH row: {"chosen": transcript, "rejected": transcript}.
    Each transcript is cut after its LAST "\\n\\nAssistant:"; the part up to and
    including it is the prompt (the two must agree), the rest the response."""
    row = _check_row(row, where, _HH_HINT)
    prompts, responses = [], []
    for name in ("chosen", "rejected"):
        text = _text(row, name, where, _HH_HINT)
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise ConfigError(f'{where}: field "{name}" has no "\\n\\nAssistant:" turn; {_HH_HINT}')
        cut += len(ASSISTANT)
        prompts.append(text[:cut])
        responses.append(text[cut:])
    if prompts[0] != prompts[1]:
        k = _first_difference(prompts[0], prompts[1]) + 1
        raise ConfigError(f'{where}: "chosen" and "rejected" differ at character {k}, before their last '
                          '"\\n\\nAssistant:"; both must continue the same conversation')
    return PreferenceExample(prompts[0], responses[0], responses[1])


def parse_shp(row: dict, where: str) -> PreferenceExample:
    """One Stanford Human Preferences row: the post `history` is the user turn;
    `labels` 1 means human_ref_A is preferred, 0 means human_ref_B is."""
    row = _check_row(row, where, _SHP_HINT)
    history = _text(row, "history", where, _SHP_HINT)
    ref_a = _text(row, "human_ref_A", where, _SHP_HINT)
    ref_b = _text(row, "human_ref_B", where, _SHP_HINT)
    label = _field(row, "labels", where, _SHP_HINT)
    if type(label) is not int or label not in (0, 1):
        raise ConfigError(f'{where}: field "labels" must be 1 (human_ref_A preferred) or 0 (human_ref_B preferred), '
                          f"got {_show(label)}")
    chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
    return PreferenceExample(_prompt_text([{"role": "user", "content": history}]),
                             _response_text(chosen), _response_text(rejected))


def _shp_score_ratio(row: Mapping, where: str) -> float:
    value = _field(row, "score_ratio", where, "dataset.min_score_ratio filters on it; set dataset.min_score_ratio=null to keep every pair")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f'{where}: field "score_ratio" must be a number, got {_json_type(value)}')
    return float(value)


def parse_ultrafeedback(row: dict, where: str) -> PreferenceExample:
    """One UltraFeedback-binarized row: "chosen" and "rejected" are full
    conversations [{"content", "role"}, ...] that differ only in the last
    assistant turn; the rest is the prompt ("prompt" itself is not used)."""
    row = _check_row(row, where, _UF_HINT)
    chosen = _messages(_field(row, "chosen", where, _UF_HINT), "chosen", where, _UF_HINT)
    rejected = _messages(_field(row, "rejected", where, _UF_HINT), "rejected", where, _UF_HINT)
    return _conversation_pair(chosen, rejected, where, require_response=False)


# ----------------------------------------------------------------------------
# Where rows come from.

def _file_rows(path: str, key: str, bad_rows: BadRows) -> tuple[str, Iterable[tuple[int, object]]]:
    """(label for messages, (row number, row) pairs) of a local file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dataset.{key}={path} does not exist; pass a local .jsonl, .json or .parquet file")
    if p.suffix in (".jsonl", ".json"):
        return str(path), read_json_rows(p, bad_rows)
    if p.suffix == ".parquet":
        import datasets

        try:
            table = datasets.load_dataset("parquet", data_files=str(p), split="train")
        except Exception as e:
            raise ConfigError(f"{path}: could not be read as Parquet ({_one_line(e)}); check the file or convert it to .jsonl")
        return str(path), enumerate(table, start=1)
    hint = "; decompress it first (e.g. gunzip)" if p.suffix in (".gz", ".bz2", ".xz", ".zst", ".zip") else ""
    raise ConfigError(f"dataset.{key}={path}: unsupported file type {_show(p.suffix or '(none)')}; "
                      f"use .jsonl, .json or .parquet{hint}")


def _hub_rows(cfg, split: str) -> tuple[str, Iterable[tuple[int, object]]]:
    name, hub = cfg.get("name"), cfg.get("hub")
    if not hub:
        raise ConfigError(f"dataset={name} needs dataset.path=<local .jsonl/.json/.parquet file> (it has no hub dataset)")
    hub_split = (cfg.get("hub_train_split") or "train") if split == "train" else (cfg.get("hub_eval_split") or "test")
    kwargs = {"data_dir": cfg.hub_data_dir} if cfg.get("hub_data_dir") else {}
    import datasets

    try:
        table = datasets.load_dataset(hub, split=hub_split, **kwargs)
    except Exception as e:
        raise ConfigError(f"dataset={name} could not be loaded from the hub ({hub}, split {hub_split}): {_one_line(e)}; "
                          "offline? pass dataset.path=<local .jsonl/.parquet file>")
    return f"{hub} ({hub_split} split)", enumerate(table, start=1)


def _load(cfg, split: str, bad_rows: BadRows | None, parse: Callable[[dict, str], PreferenceExample],
          keep: Callable[[Mapping, str], bool] | None = None) -> list[PreferenceExample]:
    """Rows of `split` ("train", or anything else for eval) parsed by `parse`,
    filtered by `keep`, then held out and capped as the config says."""
    train = split == "train"
    bad_rows = bad_rows or BadRows()
    path, eval_path = cfg.get("path"), cfg.get("eval_path")
    if eval_path and not path:
        raise ConfigError("dataset.eval_path is set but dataset.path is not; pass dataset.path=<train file> too")
    if path:
        from_eval_file = bool(eval_path) and not train
        label, rows = _file_rows(eval_path if from_eval_file else path, "eval_path" if from_eval_file else "path",
                                 bad_rows)
        hold_out = not eval_path
    else:
        label, rows = _hub_rows(cfg, split)
        hold_out = False

    examples = []
    for n, row in rows:
        where = f"{label}: row {n}"
        try:
            example = parse(row, where)
            if keep is None or keep(row, where):
                examples.append(example)
        except ConfigError as e:
            bad_rows(e)

    if hold_out:
        # One file for both splits: its last n_eval rows (after filters) are the eval split.
        n_eval = int(cfg.get("n_eval") or 0)
        if n_eval < 0:
            raise ConfigError(f"dataset.n_eval={n_eval} must be >= 0")
        if n_eval >= len(examples):
            raise ConfigError(f"dataset.path={path} has {len(examples)} usable rows, not more than dataset.n_eval={n_eval} "
                              "held out for eval; lower dataset.n_eval or pass dataset.eval_path=<eval file>")
        cut = len(examples) - n_eval
        examples = examples[:cut] if train else examples[cut:]
    n_train = cfg.get("n_train")
    if train and n_train is not None:
        if int(n_train) < 1:
            raise ConfigError(f"dataset.n_train={n_train} must be a positive number of rows, or null for all")
        examples = examples[: int(n_train)]
    return examples


# ----------------------------------------------------------------------------
# Loaders: (cfg, split) -> list[PreferenceExample], as preference_datasets.LOADERS expects.

def load_hh(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    return _load(cfg, split, bad_rows, parse_hh)


def load_shp(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    """SHP pairs, keeping only those with score_ratio >= dataset.min_score_ratio
    when it is set. score_ratio is the preferred comment's score over the other's
    (>= 1); a ratio near 1 is a near tie, a noisy label. The reference DPO repo
    keeps only pairs with a ratio of at least 2 (computed there from score_A and
    score_B, the same number), so shp.yaml sets 2.0; null keeps every pair."""
    min_ratio = cfg.get("min_score_ratio")
    if min_ratio is None:
        return _load(cfg, split, bad_rows, parse_shp)
    min_ratio = float(min_ratio)
    return _load(cfg, split, bad_rows, parse_shp, keep=lambda row, where: _shp_score_ratio(row, where) >= min_ratio)


def load_ultrafeedback(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    return _load(cfg, split, bad_rows, parse_ultrafeedback)


def load_prompt_chosen_rejected(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    """A user's file of `parse_prompt_chosen_rejected` rows with the same
    path/eval_path/n_eval/n_train handling as the public formats, .parquet
    included (dataset=jsonl)."""
    return _load(cfg, split, bad_rows, parse_prompt_chosen_rejected)
