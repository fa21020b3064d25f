"""Unpaired data: what KTO learns from.

A pair says which of two responses to a prompt is better. An unpaired row
says of a single response whether it is good: in a file,

    {"prompt": "...", "completion": "...", "label": true}    (desirable)
    {"prompt": "...", "completion": "...", "label": false}   (undesirable)

which is Hugging Face TRL's "unpaired preference" format; "prompt" and
"completion" may also be lists of {"role", "content"} messages, rendered
like conversational pairs (dataset=jsonl reads both, see jsonl.py). "label"
must be a JSON boolean. A file holds pairs or unpaired rows, not both.

In memory an unpaired row is `PreferenceExample(prompt, chosen=<completion>,
rejected=None, label=True/False)`, so it tokenizes like an SFT row: prompt,
then completion and EOS (preference_datasets.tokenize_example).

Pairs become unpaired rows with `unpair`: (prompt, chosen, rejected) gives
(prompt, chosen, label=True) then (prompt, rejected, label=False), as TRL's
`unpair_preference_dataset` does (TRL writes a whole batch's chosen rows
before its rejected ones; here each pair's two rows stay next to each other).
The config key `data.unpaired` (auto | true | false, `UNPAIRED_MODES`) says
whether that happens for a loss that learns from unpaired rows; see
preference_datasets.unpaired_rows.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence, TypeVar

from utils import ConfigError

UNPAIRED_MODES = ("auto", "true", "false")

Row = TypeVar("Row")   # PreferenceExample or TokenizedExample: both have prompt, chosen, rejected and label


def unpaired_mode(value) -> str:
    """`data.unpaired` as one of UNPAIRED_MODES. Hydra reads `true`/`false`
    on the command line as booleans; None (an older config) means auto."""
    mode = "auto" if value is None else ("true" if value else "false") if isinstance(value, bool) else value
    if mode not in UNPAIRED_MODES:
        raise ConfigError(f"data.unpaired={value} is not one of {', '.join(UNPAIRED_MODES)}")
    return mode


def is_unpaired(row) -> bool:
    """Is this parsed (or tokenized) row an unpaired one: does it carry a label?"""
    return getattr(row, "label", None) is not None


def is_unpaired_row(row) -> bool:
    """Does this row of a file have the unpaired shape: a "completion" or a
    "label" and neither "chosen" nor "rejected"? (Null counts as absent:
    a Parquet table mixing both shapes has every column in every row.)"""
    if not isinstance(row, Mapping):
        return False
    has = {key for key in ("completion", "label", "chosen", "rejected") if row.get(key) is not None}
    return bool(has & {"completion", "label"}) and not has & {"chosen", "rejected"}


def unpair(rows: Iterable[Row]) -> list[Row]:
    """Each pair (prompt, chosen, rejected) as two unpaired rows, in this
    order: (prompt, chosen, label=True), (prompt, rejected, label=False).
    Works on PreferenceExample and on TokenizedExample rows alike (tokenized
    ones must not carry reference log-probs yet: those belong to the pair)."""
    out = []
    for i, row in enumerate(rows, start=1):
        if row.rejected is None or is_unpaired(row):
            raise ConfigError(f"row {i} is not a pair (it has no rejected response), so it cannot be split into "
                              "unpaired rows")
        if getattr(row, "reference_logps", None) is not None:
            raise ValueError("split pairs before their reference log-probs are computed")
        out.append(dataclasses.replace(row, rejected=None, label=True))
        out.append(dataclasses.replace(row, chosen=row.rejected, rejected=None, label=False))
    return out


def label_counts(rows: Sequence) -> tuple[int, int]:
    """(desirable, undesirable) rows: how many have label True, how many False."""
    desirable = sum(row.label is True for row in rows)
    return desirable, sum(row.label is False for row in rows)


def with_kl_completions(batch: Sequence[Row], max_length: int) -> list[Row]:
    """KTO's KL reference point is estimated on mismatched (prompt, completion)
    pairs: each tokenized row of a micro-batch gets, in its `rejected` slot,
    the completion of the row before it ((x_1, y_n), (x_2, y_1), ...; the
    rotation TRL's KTOTrainer uses), cut to fit max_length after its own
    prompt. The batch then runs through the pair machinery unchanged: the
    "chosen" log-probs are the rows', the "rejected" ones the KL terms'."""
    check_kl_batch(len(batch))
    return [dataclasses.replace(row, rejected=batch[i - 1].chosen[: max(1, max_length - len(row.prompt))])
            for i, row in enumerate(batch)]


def check_kl_batch(rows: int) -> None:
    """A micro-batch of one row has no other row to borrow a KL completion from."""
    if rows < 2:
        raise ConfigError("loss=kto needs at least 2 rows per micro-batch: its KL estimate pairs each prompt with "
                          "another row's completion; raise batch_size or lower gradient_accumulation_steps")
