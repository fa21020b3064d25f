"""A user's own file (dataset=jsonl): {"prompt", "chosen", "rejected"} rows of
text, or of chat messages (conversational rows); or unpaired rows for KTO,
{"prompt", "completion", "label"}, text or conversational too (unpaired.py
describes that format). A file holds one kind or the other."""
from __future__ import annotations

from typing import Mapping

from prefopt.data.conversation import (
    conversation_pair,
    last_turn,
    prompt_text,
    response_text,
    row_messages,
)
from prefopt.data.sources import load_rows
from prefopt.data.types import BadRows, PreferenceExample, check_row, json_type, row_field, row_text, show
from prefopt.data.unpaired import is_unpaired_row
from utils import ConfigError

_PCR_HINT = 'every row needs "prompt", "chosen" and "rejected"'
_UNPAIRED_HINT = 'an unpaired row needs "prompt", "completion" and "label" (true: desirable, false: undesirable)'
_PAIR_SHAPE, _UNPAIRED_SHAPE = '("prompt", "chosen", "rejected")', '("prompt", "completion", "label")'


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
    row = check_row(row, where, _PCR_HINT)
    for name in ("chosen", "rejected"):
        row_field(row, name, where, _PCR_HINT)
    if isinstance(row["chosen"], (list, tuple)) or isinstance(row["rejected"], (list, tuple)):
        prompt, (chosen, rejected) = _conversational(row, where, ("chosen", "rejected"), _PCR_HINT,
                                                     '"chosen" and "rejected" must both be message lists here')
        return PreferenceExample(prompt, chosen, rejected)
    prompt = row_text(row, "prompt", where, _PCR_HINT)
    chosen = row_text(row, "chosen", where, _PCR_HINT + ' ("chosen"/"rejected" may also be lists of {"role", '
                                                        '"content"} messages)')
    rejected = row_text(row, "rejected", where, _PCR_HINT + ' ("chosen"/"rejected" may also be lists of {"role", '
                                                            '"content"} messages)')
    return PreferenceExample(prompt, chosen, rejected)


def parse_unpaired(row: dict, where: str) -> PreferenceExample:
    """One unpaired row of a user's file: {"prompt", "completion", "label"},
    "label" a JSON boolean (true: desirable, false: undesirable). Two shapes,
    as for pairs (`parse_prompt_chosen_rejected`):

    - text: "prompt" and "completion" strings, used as they are;
    - conversational: "completion" a list of {"role", "content"} messages,
      "prompt" a message list (the completion then holds the reply alone, or
      the whole conversation starting with those prompt messages), a string
      (one user turn, when the completion is a single assistant message), or
      left out (the completion's last assistant turn is the response, the
      messages before it the prompt).

    The completion is kept in `chosen`, with `rejected` None and `label` set."""
    row = check_row(row, where, _UNPAIRED_HINT)
    completion = row_field(row, "completion", where, _UNPAIRED_HINT)
    if isinstance(completion, (list, tuple)):
        prompt, (completion,) = _conversational(row, where, ("completion",), _UNPAIRED_HINT,
                                                'give "completion" as a string or a non-empty message list')
    else:
        prompt = row_text(row, "prompt", where, _UNPAIRED_HINT)
        completion = row_text(row, "completion", where, _UNPAIRED_HINT + ' ("prompt"/"completion" may also be '
                                                                         'lists of {"role", "content"} messages)')
    label = row_field(row, "label", where, _UNPAIRED_HINT)
    if not isinstance(label, bool):
        raise ConfigError(f'{where}: field "label" must be true or false (a JSON boolean), got {json_type(label)} '
                          f"{show(label)}; {_UNPAIRED_HINT}")
    return PreferenceExample(prompt, completion, None, label)


def parse_row(row: dict, where: str) -> PreferenceExample:
    """A row of either kind: unpaired (`parse_unpaired`) when it has a
    "completion" or a "label" and no "chosen"/"rejected", else a pair
    (`parse_prompt_chosen_rejected`)."""
    return parse_unpaired(row, where) if is_unpaired_row(row) else parse_prompt_chosen_rejected(row, where)


def _conversational(row: Mapping, where: str, names: tuple[str, ...], text_hint: str,
                    hint: str) -> tuple[str, list[str]]:
    """(prompt, the responses in `names`) of a conversational row, rendered."""
    responses = [row_messages(row[name], name, where, hint) for name in names]
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list, tuple)):
        raise ConfigError(f'{where}: field "prompt" must be a string or a list of {{"role", "content"}} messages, '
                          f"got {json_type(prompt)}")
    if isinstance(prompt, (list, tuple)):
        prompt_messages = row_messages(prompt, "prompt", where, 'give "prompt" as a string or a non-empty message list')
        n = len(prompt_messages)
        replies = []
        for name, messages in zip(names, responses):
            if len(messages) > n and messages[:n] == prompt_messages:
                messages = messages[n:]  # the whole conversation was given: drop the repeated prompt
            if len(messages) != 1:
                raise ConfigError(f'{where}: field "{name}" must hold one assistant reply after "prompt", '
                                  f"found {len(messages)} messages")
            replies.append(last_turn(messages, name, where, require_response=True)[1])
        return prompt_text(prompt_messages), [response_text(r) for r in replies]
    if isinstance(prompt, str) and all(len(m) == 1 for m in responses):
        prompt = row_text(row, "prompt", where, text_hint)
        replies = [last_turn(m, name, where, require_response=True)[1] for name, m in zip(names, responses)]
        return prompt_text([{"role": "user", "content": prompt}]), [response_text(r) for r in replies]
    if len(names) == 2:
        pair = conversation_pair(*responses, where, require_response=True)
        return pair.prompt, [pair.chosen, pair.rejected]
    before, reply = last_turn(responses[0], names[0], where, require_response=True)
    if not before:
        raise ConfigError(f'{where}: "{names[0]}" holds only the assistant reply and there is no "prompt"; '
                          'add "prompt" or the user turn before the reply')
    return prompt_text(before), [response_text(reply)]


def load_prompt_chosen_rejected(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    """A user's file of pairs (`parse_prompt_chosen_rejected`) or of unpaired
    rows (`parse_unpaired`) with the same path/eval_path/n_eval/n_train
    handling as the public formats, .parquet included (dataset=jsonl). A file
    mixing the two kinds is refused, naming the first row of the other kind."""
    first = {}   # unpaired? -> where its first good row is

    def parse(row, where: str) -> PreferenceExample:
        example = parse_row(row, where)
        first.setdefault(example.label is not None, where)
        return example

    rows = load_rows(cfg, split, bad_rows, parse)
    if len(first) == 2:
        file_unpaired = next(iter(first))   # the kind of the file's first good row
        other = first[not file_unpaired]
        shapes = (_PAIR_SHAPE, _UNPAIRED_SHAPE)
        raise ConfigError(f"{other}: {'a pair' if file_unpaired else 'an unpaired row'} "
                          f"{shapes[not file_unpaired]} after {'unpaired rows' if file_unpaired else 'pairs'} "
                          f"{shapes[file_unpaired]}; a file holds one kind of row: split it in two or write every "
                          "row in one shape (for loss=kto, data.unpaired=auto turns a file of pairs into unpaired "
                          "rows)")
    return rows
