"""The bundled task: sort a few letters. It is verifiable (the chosen answer is
the only right one), a tiny model learns it in a minute on a CPU, and the
rejected answer is a near miss (two neighbours swapped), so preferring the
chosen one requires having learned the task, not a surface cue."""
from __future__ import annotations

import random

from prefopt.data.types import PreferenceExample

SORT_ALPHABET = "abcdefghijklmnop"


def _sort_example(rng: random.Random, min_len: int, max_len: int) -> PreferenceExample:
    n = rng.randint(min_len, max_len)
    if max_len <= len(SORT_ALPHABET):
        letters = rng.sample(SORT_ALPHABET, n)
    else:  # long sequences (e.g. for bench.py): letters repeat; swap two that differ
        letters = rng.choices(SORT_ALPHABET, k=n)
        if len(set(letters)) < 2:
            letters[0] = "a" if letters[0] != "a" else "b"
    answer = sorted(letters)
    i = rng.randrange(n - 1)
    while answer[i] == answer[i + 1]:
        i = rng.randrange(n - 1)
    wrong = answer.copy()
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    return PreferenceExample(prompt="".join(letters) + "=", chosen="".join(answer), rejected="".join(wrong))


def load_synthetic(cfg, split: str, bad_rows=None) -> list[PreferenceExample]:
    """Deterministic train/eval splits; no eval prompt appears in train."""
    n_train, n_eval = cfg.n_train, cfg.n_eval
    rng = random.Random(cfg.seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_eval:
        ex = _sort_example(rng, cfg.min_len, cfg.max_len)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            rows.append(ex)
    return rows[n_eval:] if split == "train" else rows[:n_eval]
