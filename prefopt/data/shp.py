"""stanfordnlp/SHP: a Reddit post and two comments, the preferred one by label."""
from __future__ import annotations

from typing import Mapping

from prefopt.data.conversation import (
    prompt_text,
    response_text,
)
from prefopt.data.sources import load_rows
from prefopt.data.types import BadRows, PreferenceExample, check_row, json_type, row_field, row_text, show
from utils import ConfigError

_SHP_HINT = 'every SHP row needs "history", "human_ref_A", "human_ref_B" and "labels"'


def parse_shp(row: dict, where: str) -> PreferenceExample:
    """One Stanford Human Preferences row: the post `history` is the user turn;
    `labels` 1 means human_ref_A is preferred, 0 means human_ref_B is."""
    row = check_row(row, where, _SHP_HINT)
    history = row_text(row, "history", where, _SHP_HINT)
    ref_a = row_text(row, "human_ref_A", where, _SHP_HINT)
    ref_b = row_text(row, "human_ref_B", where, _SHP_HINT)
    label = row_field(row, "labels", where, _SHP_HINT)
    if type(label) is not int or label not in (0, 1):
        raise ConfigError(f'{where}: field "labels" must be 1 (human_ref_A preferred) or 0 (human_ref_B preferred), '
                          f"got {show(label)}")
    chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
    return PreferenceExample(prompt_text([{"role": "user", "content": history}]),
                             response_text(chosen), response_text(rejected))


def _shp_score_ratio(row: Mapping, where: str) -> float:
    value = row_field(row, "score_ratio", where, "dataset.min_score_ratio filters on it; set "
                                                 "dataset.min_score_ratio=null to keep every pair")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f'{where}: field "score_ratio" must be a number, got {json_type(value)}')
    return float(value)


def load_shp(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    """SHP pairs, keeping only those with score_ratio >= dataset.min_score_ratio
    when it is set. score_ratio is the preferred comment's score over the other's
    (>= 1); a ratio near 1 is a near tie, a noisy label. The reference DPO repo
    keeps only pairs with a ratio of at least 2 (computed there from score_A and
    score_B, the same number), so shp.yaml sets 2.0; null keeps every pair."""
    min_ratio = cfg.get("min_score_ratio")
    if min_ratio is None:
        return load_rows(cfg, split, bad_rows, parse_shp)
    min_ratio = float(min_ratio)
    return load_rows(cfg, split, bad_rows, parse_shp, keep=lambda row, where: _shp_score_ratio(row, where) >= min_ratio)
