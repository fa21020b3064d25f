"""HuggingFaceH4/ultrafeedback_binarized: chosen and rejected chat-message lists."""
from __future__ import annotations

from prefopt.data.conversation import (
    conversation_pair,
    row_messages,
)
from prefopt.data.sources import load_rows
from prefopt.data.types import BadRows, PreferenceExample, check_row, row_field

_UF_HINT = 'every UltraFeedback row needs "chosen" and "rejected" lists of {"content", "role"} messages'


def parse_ultrafeedback(row: dict, where: str) -> PreferenceExample:
    """One UltraFeedback-binarized row: "chosen" and "rejected" are full
    conversations [{"content", "role"}, ...] that differ only in the last
    assistant turn; the rest is the prompt ("prompt" itself is not used)."""
    row = check_row(row, where, _UF_HINT)
    chosen = row_messages(row_field(row, "chosen", where, _UF_HINT), "chosen", where, _UF_HINT)
    rejected = row_messages(row_field(row, "rejected", where, _UF_HINT), "rejected", where, _UF_HINT)
    return conversation_pair(chosen, rejected, where, require_response=False)


def load_ultrafeedback(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    return load_rows(cfg, split, bad_rows, parse_ultrafeedback)
