"""A user's own file (dataset=jsonl): {"prompt", "chosen", "rejected"} rows of
text, or of chat messages (conversational rows)."""
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
from prefopt.data.types import BadRows, PreferenceExample, check_row, json_type, row_field, row_text
from utils import ConfigError

_PCR_HINT = 'every row needs "prompt", "chosen" and "rejected"'


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
        return _parse_conversational(row, where)
    prompt = row_text(row, "prompt", where, _PCR_HINT)
    chosen = row_text(row, "chosen", where, _PCR_HINT + ' ("chosen"/"rejected" may also be lists of {"role", '
                                                        '"content"} messages)')
    rejected = row_text(row, "rejected", where, _PCR_HINT + ' ("chosen"/"rejected" may also be lists of {"role", '
                                                            '"content"} messages)')
    return PreferenceExample(prompt, chosen, rejected)


def _parse_conversational(row: Mapping, where: str) -> PreferenceExample:
    hint = '"chosen" and "rejected" must both be message lists here'
    chosen = row_messages(row["chosen"], "chosen", where, hint)
    rejected = row_messages(row["rejected"], "rejected", where, hint)
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list, tuple)):
        raise ConfigError(f'{where}: field "prompt" must be a string or a list of {{"role", "content"}} messages, '
                          f"got {json_type(prompt)}")
    single = len(chosen) == 1 and len(rejected) == 1
    if isinstance(prompt, (list, tuple)):
        prompt_messages = row_messages(prompt, "prompt", where, 'give "prompt" as a string or a non-empty message list')
        n = len(prompt_messages)
        replies = []
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) > n and messages[:n] == prompt_messages:
                messages = messages[n:]  # the whole conversation was given: drop the repeated prompt
            if len(messages) != 1:
                raise ConfigError(f'{where}: field "{name}" must hold one assistant reply after "prompt", '
                                  f"found {len(messages)} messages")
            replies.append(last_turn(messages, name, where, require_response=True)[1])
        return PreferenceExample(prompt_text(prompt_messages), response_text(replies[0]), response_text(replies[1]))
    if isinstance(prompt, str) and single:
        prompt = row_text(row, "prompt", where, _PCR_HINT)
        replies = [last_turn(m, name, where, require_response=True)[1]
                   for name, m in (("chosen", chosen), ("rejected", rejected))]
        return PreferenceExample(prompt_text([{"role": "user", "content": prompt}]),
                                 response_text(replies[0]), response_text(replies[1]))
    return conversation_pair(chosen, rejected, where, require_response=True)


def load_prompt_chosen_rejected(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    """A user's file of `parse_prompt_chosen_rejected` rows with the same
    path/eval_path/n_eval/n_train handling as the public formats, .parquet
    included (dataset=jsonl)."""
    return load_rows(cfg, split, bad_rows, parse_prompt_chosen_rejected)
