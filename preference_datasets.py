"""Preference data: where rows come from, how they are tokenized, how batches
are made.

A row is a `PreferenceExample(prompt, chosen, rejected)`; `rejected` may be
None for SFT-only data. An unpaired row (KTO's data) is
`PreferenceExample(prompt, completion, None, label=True/False)`; see
prefopt/data/unpaired.py and `unpaired_rows` (`data.unpaired`), which turns
pairs into unpaired rows for a loss that learns from them.
`dataset=<name>` picks a loader from `LOADERS`:

  synthetic      bundled, generated in code, verifiable (the default)
  jsonl          a local .jsonl/.json/.parquet file of {"prompt","chosen","rejected"}
                 rows (or conversational message lists), or of unpaired
                 {"prompt","completion","label"} rows
  hh, shp, ultrafeedback   the public formats
Each loader is one file of the prefopt/data package.

Tokenization follows the reference DPO repo: the prompt is truncated first
(to `max_prompt_length`), then the responses (to fit `max_length`); prompt
tokens are masked out of the loss with label -100; EOS ends each response
(an unpaired row's completion too: it tokenizes like an SFT row).
Batches are padded to their own longest sequence, not to max_length.
`data.add_bos` (see `tokenize_rows`) decides whether the prompt starts with
the tokenizer's BOS token; the default follows the tokenizer, as TRL does.

Data that cannot teach is caught before training (`drop_identical_pairs`,
`split_overlap_warning`); text that is not valid Unicode (a lone UTF-16
surrogate from a JSON escape) is a bad row, caught by the parsers.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from prefopt.data import hh, jsonl, shp, synthetic, ultrafeedback
from prefopt.data.types import BadRows, PreferenceExample
from prefopt.data.unpaired import is_unpaired, label_counts, unpair, unpaired_mode
from utils import ConfigError

IGNORE_INDEX = -100


# `dataset=<name>` -> its loader: (dataset config, split, BadRows) -> rows.
LOADERS = {
    "synthetic": synthetic.load_synthetic,
    "jsonl": jsonl.load_prompt_chosen_rejected,
    "hh": hh.load_hh,
    "shp": shp.load_shp,
    "ultrafeedback": ultrafeedback.load_ultrafeedback,
}


def get_examples(cfg, split: str, bad_rows: BadRows | None = None) -> list[PreferenceExample]:
    if cfg.name not in LOADERS:
        raise ConfigError(f"dataset={cfg.name} is unknown; choose one of {', '.join(LOADERS)}")
    rows = LOADERS[cfg.name](cfg, split, bad_rows or BadRows())
    if not rows:
        raise ConfigError(f"dataset={cfg.name} has no {split} rows; check dataset.path and its contents")
    return rows


def unpaired_rows(rows: list, mode, loss_unpaired: bool, loss_name: str | None = None) -> tuple[list, str | None]:
    """(the rows a loss trains or evaluates on, a one-line note or None), as
    `data.unpaired` (auto | true | false) says. Rows are PreferenceExample or
    TokenizedExample rows (see prefopt/data/unpaired.py for the format).

    A loss that learns from unpaired rows (`loss_unpaired`, e.g. KTO) gets:
      pairs           split by auto and true, each into (prompt, chosen,
                      label=True) then (prompt, rejected, label=False); false
                      refuses them (ConfigError);
      unpaired rows   as they are, whatever the mode.
    The note counts the desirable and undesirable rows; when one kind is
    missing it is a warning (TRL's KTO trains on such data too, but the loss
    then only pushes one way).
    Any other loss (the DPO family, SFT) gets its rows as they are, no note;
    unpaired rows, or data.unpaired=true, are a ConfigError for it.
    `loss_name` only words the messages ("loss=kto")."""
    mode = unpaired_mode(mode)
    loss = f"loss={loss_name}" if loss_name else "this loss"
    n_unpaired = sum(map(is_unpaired, rows))
    if 0 < n_unpaired < len(rows):
        raise ConfigError(f"{n_unpaired} of {len(rows)} rows are unpaired (they have a label) and the others are "
                          "not; give one kind of row")
    if not loss_unpaired:
        if n_unpaired:
            raise ConfigError(f'{loss} needs pairs ("chosen"/"rejected") but the data holds {n_unpaired} unpaired '
                              'rows ("completion" with a "label"); use loss=kto, which learns from unpaired rows, '
                              "or a file of pairs")
        if mode == "true":
            raise ConfigError(f"data.unpaired=true only applies to a loss that learns from unpaired data, such as "
                              f"loss=kto; {loss} trains on the rows as they are: use data.unpaired=auto or false")
        return rows, None
    if not rows:
        return rows, None
    if n_unpaired:
        desirable, undesirable = label_counts(rows)
        counts = f"{desirable} desirable (label true), {undesirable} undesirable (label false)"
        if desirable and undesirable:
            return rows, f"{len(rows)} unpaired rows for {loss}: {counts}"
        only, other = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
        return rows, (f"warning: all {len(rows)} unpaired rows for {loss} are {only} ({counts}): the loss can only "
                      f"push these completions one way, with no {other} example to contrast them with; add rows "
                      f"labelled {str(not desirable).lower()} if you have them")
    n_sft = sum(r.rejected is None for r in rows)
    if n_sft:
        raise ConfigError(f"{loss} learns from unpaired rows but {n_sft} of {len(rows)} rows have neither a rejected "
                          'response nor a label; give pairs (data.unpaired=auto splits them) or a file of '
                          '{"prompt", "completion", "label"} rows')
    if mode == "false":
        raise ConfigError(f"{loss} learns from unpaired rows but the data holds {len(rows)} pairs and "
                          "data.unpaired=false; set data.unpaired=auto (or true) to split each pair into its chosen "
                          '(label true) and rejected (label false) response, or pass a file of {"prompt", '
                          '"completion", "label"} rows')
    n = len(rows)
    return unpair(rows), (f"data.unpaired={mode}: split {n} pairs into {2 * n} unpaired rows for {loss}: {n} "
                          f"desirable (each chosen response, label true), {n} undesirable (each rejected one, label "
                          "false)")


# ----------------------------------------------------------------------------
# Tokenization.

def _chat_template_on(tokenizer, dataset_cfg) -> bool:
    """Does `dataset.chat_template` render prompts with this tokenizer?"""
    mode = dataset_cfg.get("chat_template", False)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "auto":
        return has_template
    if mode and not has_template:
        raise ConfigError("dataset.chat_template=true but the tokenizer has no chat template; use false or auto")
    return bool(mode)


def apply_chat_template(rows: list[PreferenceExample], tokenizer, dataset_cfg) -> list[PreferenceExample]:
    """`dataset.chat_template`: true renders each prompt as one user turn (after
    `dataset.system_prompt`, if set) with the tokenizer's chat template, ending
    with the assistant header, so an instruct model (SmolLM2) sees the format it
    was tuned on; each response then ends with the tokenizer's EOS, which for
    such models is the end-of-turn token (<|im_end|>). `auto` does so when the
    tokenizer has a template (a GGUF or HF tokenizer) and not for the byte
    tokenizer; false (the default) keeps prompts as plain text."""
    if not _chat_template_on(tokenizer, dataset_cfg):
        return rows
    system = dataset_cfg.get("system_prompt")
    head = [{"role": "system", "content": system}] if system else []

    def render(prompt: str) -> str:
        return tokenizer.apply_chat_template(head + [{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)

    return [dataclasses.replace(r, prompt=render(r.prompt)) for r in rows]


@dataclass
class TokenizedExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None
    reference_logps: tuple[float, float] | None = None  # (chosen, rejected), set by loss.precompute_reference
    label: bool | None = None   # an unpaired row: its completion (in `chosen`) is desirable (True) or not (False)


def tokenize_example(ex: PreferenceExample, tokenizer, max_length: int, max_prompt_length: int,
                     truncation_mode: str = "keep_end", bos_id: int | None = None) -> TokenizedExample:
    """Prompt and response token ids, EOS after each response, truncated to
    fit `max_length` (see the module docstring).

    `bos_id`: None tokenizes the prompt as it is (no special tokens, the
    reference repo). A token id makes the prompt start with that token exactly
    once: it is prepended unless the text already starts with it (a chat
    template that writes BOS), and truncation never cuts it off: `keep_end`
    keeps BOS and the end of the prompt."""
    prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for r in (ex.chosen, ex.rejected) if r is not None]
    head = []
    if bos_id is not None:
        head, prompt = [bos_id], (prompt[1:] if prompt[:1] == [bos_id] else prompt)
    longest = max(len(r) for r in responses)
    if len(head) + len(prompt) + longest > max_length:
        # keep_end keeps the last turns of a dialogue (HH); keep_start the task statement.
        room = max(0, max_prompt_length - len(head))
        prompt = prompt[len(prompt) - room:] if truncation_mode == "keep_end" and room < len(prompt) else prompt[:room]
    prompt = head + prompt
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - len(prompt)] for r in responses]
    return TokenizedExample(prompt, responses[0], responses[1] if len(responses) > 1 else None, label=ex.label)


ADD_BOS = ("auto", "always", "never")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Does the tokenizer's own convention put BOS first? (Llama's and most
    pretrained tokenizers do; GPT-2's, SmolLM2's and the byte tokenizer don't.)
    Asked of the tokenizer itself: `add_bos_token` attributes are not reliable
    across tokenizer classes."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def add_bos_mode(value) -> str:
    """`data.add_bos` as one of ADD_BOS (true/false from Python mean always/never)."""
    mode = "auto" if value is None else {True: "always", False: "never"}[value] if isinstance(value, bool) else value
    if mode not in ADD_BOS:
        raise ConfigError(f"data.add_bos={value} is not one of {', '.join(ADD_BOS)}")
    return mode


def prompt_bos(tokenizer, add_bos="auto") -> int | None:
    """The BOS id that prompts start with under `data.add_bos`, or None."""
    mode = add_bos_mode(add_bos)
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always" and bos is None:
        raise ConfigError("data.add_bos=always but the tokenizer has no BOS token; use auto or never")
    if mode == "never" or (mode == "auto" and not tokenizer_adds_bos(tokenizer)):
        return None
    return bos


def tokenize_rows(rows: list[PreferenceExample], tokenizer, cfg) -> list[TokenizedExample]:
    """Rows as the trainer tokenizes them: `dataset.chat_template`, then
    `tokenize_example` with the run's lengths, `dataset.truncation_mode` and
    `data.add_bos`:
      auto    the tokenizer's convention, as Hugging Face TRL follows it: a
              plain-text prompt starts with BOS exactly when `tokenizer("x")`
              (special tokens on) starts with BOS, once even if the text
              already begins with it. A chat-templated prompt keeps what the
              template wrote (a template writes every special token its model
              needs; TRL tokenizes conversations with the template alone). For
              the byte tokenizer and SmolLM2's (neither adds BOS) nothing changes.
      always  BOS first in every prompt (once), whatever the tokenizer does.
      never   no special tokens in prompts: the reference DPO repo.
    A BOS put first this way survives keep_end truncation."""
    mode = add_bos_mode((cfg.get("data") or {}).get("add_bos", "auto"))
    bos = prompt_bos(tokenizer, mode)
    template_decides = mode == "auto" and _chat_template_on(tokenizer, cfg.dataset)
    rows = apply_chat_template(rows, tokenizer, cfg.dataset)
    truncation = cfg.dataset.get("truncation_mode", "keep_end")

    def bos_of(prompt: str) -> int | None:
        written = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
        return None if template_decides and not written else bos

    return [tokenize_example(r, tokenizer, cfg.max_length, cfg.max_prompt_length, truncation, bos_of(r.prompt))
            for r in rows]


# ----------------------------------------------------------------------------
# Data that cannot teach.

def drop_identical_pairs(train: list[TokenizedExample], eval_examples: list[TokenizedExample] = (),
                         max_length: int | None = None) -> tuple[list[TokenizedExample], str | None]:
    """(the train pairs whose chosen and rejected token ids differ, a one-line
    warning or None). Compared as token ids after truncation, i.e. exactly what
    the model scores: identical strings, strings the tokenizer normalizes to
    the same ids, and responses that differ only past `max_length` all count.
    Such a pair has zero gradient under every preference loss (the two
    log-probabilities are the same function of the weights), so it only
    dilutes its batch: it is dropped. Eval pairs are counted, not dropped
    (eval rows stay aligned with the generations graded on them).
    Every train pair identical is a ConfigError: the run could not learn.
    SFT and unpaired rows (no rejected response) are not pairs: always kept.
    (Split pairs into unpaired rows after this: an identical pair split gives
    the same completion labelled both ways.)"""
    def same(ex):
        return ex.rejected is not None and ex.chosen == ex.rejected

    kept = [ex for ex in train if not same(ex)]
    n_same, n_eval_same = len(train) - len(kept), sum(map(same, eval_examples))
    what = "compared as token ids" + (f", after truncation to max_length={max_length}" if max_length else "")
    if train and not kept:
        raise ConfigError(f"all {len(train)} train pairs have chosen == rejected ({what}): a preference loss gets "
                          "zero gradient from such a pair and cannot move (DPO stays at ln 2); check that "
                          '"chosen" and "rejected" hold the two different responses, or train with loss=sft')
    eval_note = (f"{n_eval_same} of {len(eval_examples)} eval pairs" if n_eval_same else "")
    if n_same:
        message = (f"warning: {n_same} of {len(train)} train pairs have chosen == rejected ({what}); dropped from "
                   "training: such a pair has zero gradient and only dilutes its batch")
        if eval_note:
            message += f"; {eval_note} too (kept in eval, where they score a reward margin of about 0)"
        return kept, message
    if eval_note:
        return kept, (f"warning: {eval_note} have chosen == rejected ({what}); kept in eval, where they score a "
                      "reward margin of about 0 and lower rewards_eval/accuracies")
    return kept, None


def split_overlap_warning(train: list[PreferenceExample], eval_rows: list[PreferenceExample]) -> str | None:
    """One warning line when eval rows share their prompt with a train row, or
    None. The prompt is the key, not the whole pair: a model trained on a
    prompt has learned what is preferred for it, whatever pair the eval row
    holds, so eval then measures recall, not generalization (the bundled task
    guarantees disjoint prompts for this reason). Exact duplicates (prompt,
    chosen and rejected; for unpaired rows prompt, completion and label) are
    counted among them. Strings are compared exactly, as loaded (before the
    chat template, which renders equal prompts equally)."""
    prompts = {r.prompt for r in train}
    rows = {(r.prompt, r.chosen, r.rejected, r.label) for r in train}
    shared = [r for r in eval_rows if r.prompt in prompts]
    if not shared:
        return None
    exact = sum((r.prompt, r.chosen, r.rejected, r.label) in rows for r in shared)
    same = "completion and label" if any(map(is_unpaired, shared)) else "chosen and rejected"
    return (f"warning: {len(shared)} of {len(eval_rows)} eval rows share their prompt with a train row "
            f"({exact} of them the same prompt, {same}): eval on them measures recall of training "
            "data, not generalization; deduplicate the file or pass dataset.eval_path=<rows with other prompts>")


def _pad(seqs: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, length - len(s):] = torch.tensor(s)
        else:
            out[i, : len(s)] = torch.tensor(s)
    return out


def collate(examples: list[TokenizedExample], pad_id: int, with_rejected: bool,
            share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """One padded batch of B pairs (B rows of SFT data without `with_rejected`).

    The logical sequences are `prompt + chosen` for every pair, then
    `prompt + rejected` (2B of them, B for SFT), in one of two layouts:
      separate       one row per sequence, 2B rows: the reference repo's
                     concatenated forward, one pass for chosen and rejected.
      share_prompt   one row per pair, `prompt + chosen + rejected`: the prompt
                     goes through the model once instead of twice. A 4-D
                     attention mask hides the chosen tokens from the rejected
                     ones and the rejected positions restart after the prompt,
                     so every token sees exactly what it would in its own row
                     (prefix sharing: same log-probs, fewer FLOPs).
    Both say which hidden state predicts which scored (response) token, so the
    LM head runs only there (losses.gathered_logps):
      score_rows     flat index into the (rows x T) hidden states
      score_targets  the token predicted at that state
      score_seq      the logical sequence (0..2B-1) it counts towards
      n_scored       (2B,) scored tokens per logical sequence
      lengths        (2B,) tokens per logical sequence (what tokens/s counts)
    The separate layout also carries `labels` (prompt and padding = -100).
    """
    responses = [ex.chosen for ex in examples] + ([ex.rejected for ex in examples] if with_rejected else [])
    prompts = [ex.prompt for ex in examples] * (2 if with_rejected else 1)
    batch = (_collate_shared(examples, pad_id) if with_rejected and share_prompt
             else _collate_separate(prompts, responses, pad_id))
    batch["lengths"] = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
    if with_rejected and all(ex.reference_logps is not None for ex in examples):
        batch["reference_logps"] = torch.tensor([ex.reference_logps[0] for ex in examples] +
                                                [ex.reference_logps[1] for ex in examples])
    return batch


def _collate_separate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    sequences = [p + r for p, r in zip(prompts, responses)]
    length = max(len(s) for s in sequences)
    input_ids = _pad(sequences, pad_id, length)
    attention_mask = _pad([[1] * len(s) for s in sequences], 0, length)
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    for i, p in enumerate(prompts):
        labels[i, :len(p)] = IGNORE_INDEX
    scored = labels[:, 1:] != IGNORE_INDEX  # token t+1 is predicted by the state at t
    seq, t = scored.nonzero(as_tuple=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "score_rows": seq * length + t, "score_targets": labels[seq, t + 1], "score_seq": seq,
            "n_scored": scored.sum(-1)}


_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3   # what a position of a shared row holds


def _collate_shared(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    b = len(examples)
    length = max(len(ex.prompt) + len(ex.chosen) + len(ex.rejected) for ex in examples)
    input_ids = _pad([ex.prompt + ex.chosen + ex.rejected for ex in examples], pad_id, length)
    segment = torch.full((b, length), _PAD)     # what each position holds
    position_ids = torch.zeros((b, length), dtype=torch.long)
    rows, targets, seqs, n_scored = [], [], [], [[0] * b, [0] * b]
    for i, ex in enumerate(examples):
        p, c, r = len(ex.prompt), len(ex.chosen), len(ex.rejected)
        segment[i, :p], segment[i, p:p + c], segment[i, p + c:p + c + r] = _PROMPT, _CHOSEN, _REJECTED
        position_ids[i, :p + c] = torch.arange(p + c)
        position_ids[i, p + c:p + c + r] = torch.arange(p, p + r)
        # the state before each response token: the previous token of the same
        # response, or the prompt's last token for the first one (none if p == 0)
        for kind, start, response in ((0, p, ex.chosen), (1, p + c, ex.rejected)):
            before = [p - 1] + list(range(start, start + len(response) - 1))
            scored = [(s, tok) for s, tok in zip(before, response) if s >= 0]
            rows += [i * length + s for s, _ in scored]
            targets += [tok for _, tok in scored]
            seqs += [kind * b + i] * len(scored)
            n_scored[kind][i] = len(scored)
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & (q != _PAD) & (k != _PAD) & ~((q == _REJECTED) & (k == _CHOSEN))
    # padding queries attend to themselves: a row with nothing to attend to
    # would be NaN, and a NaN activation poisons weight gradients even unscored
    mask |= torch.eye(length, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
            "score_rows": torch.tensor(rows, dtype=torch.long),
            "score_targets": torch.tensor(targets, dtype=torch.long),
            "score_seq": torch.tensor(seqs, dtype=torch.long), "n_scored": torch.tensor(n_scored[0] + n_scored[1])}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched greedy generation."""
    length = max(len(p) for p in prompts)
    return {"input_ids": _pad(prompts, pad_id, length, left=True),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, length, left=True)}


# ----------------------------------------------------------------------------
# Batching with a position that can be saved and restored (for exact resume).

class BatchStream:
    """Endless stream of global batches (lists of examples) over `examples`:
    each epoch is a fresh permutation seeded by (seed, epoch), so the order
    depends only on the position, which `state()`/`load_state()` save and
    restore for an exact resume."""

    def __init__(self, examples: list[TokenizedExample], batch_size: int, seed: int):
        if len(examples) < batch_size:
            raise ConfigError(f"the training set has {len(examples)} rows, fewer than batch_size={batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_examples(self) -> list[TokenizedExample]:
        if self.index + self.batch_size > len(self._order):  # drop the ragged tail
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return [self.examples[i] for i in idx]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()
