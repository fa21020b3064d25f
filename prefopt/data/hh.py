"""Anthropic/hh-rlhf: two transcripts that share everything but the last assistant turn."""
from __future__ import annotations

from prefopt.data.conversation import (
    ASSISTANT,
    first_difference,
)
from prefopt.data.sources import load_rows
from prefopt.data.types import BadRows, PreferenceExample, check_row, row_text
from utils import ConfigError

_HH_HINT = 'every HH row needs "chosen" and "rejected" transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")'


def parse_hh(row: dict, where: str) -> PreferenceExample:
    """One Anthropic HH row: {"chosen": transcript, "rejected": transcript}.
    Each transcript is cut after its LAST "\\n\\nAssistant:"; the part up to and
    including it is the prompt (the two must agree), the rest the response."""
    row = check_row(row, where, _HH_HINT)
    prompts, responses = [], []
    for name in ("chosen", "rejected"):
        text = row_text(row, name, where, _HH_HINT)
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise ConfigError(f'{where}: field "{name}" has no "\\n\\nAssistant:" turn; {_HH_HINT}')
        cut += len(ASSISTANT)
        prompts.append(text[:cut])
        responses.append(text[cut:])
    if prompts[0] != prompts[1]:
        k = first_difference(prompts[0], prompts[1]) + 1
        raise ConfigError(f'{where}: "chosen" and "rejected" differ at character {k}, before their last '
                          '"\\n\\nAssistant:"; both must continue the same conversation')
    return PreferenceExample(prompts[0], responses[0], responses[1])


def load_hh(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    return load_rows(cfg, split, bad_rows, parse_hh)
