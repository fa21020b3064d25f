"""End to end against Hugging Face TRL (issue #14): the same initial weights
and the same 8 pairs, trained a few SGD steps by TRL's `DPOTrainer(loss_type=X)`
and by our trainer with `loss=X`, give the same loss at every step (1e-5), for
every loss type of TRL 1.16's DPOTrainer, RPO (a weighted sum) and the LD-DPO,
f-DPO and WPO modifiers, in both of our batch layouts (share_prompt=true and
false).

One batch of 8 pairs per step (batch_size=8, 8 rows) on both sides, so each
step sees every pair whatever order each trainer shuffles in. The token ids
both trainers score are compared first, so a tokenization drift fails as
such instead of as a loss mismatch. TRL is pinned in requirements-test.txt."""
import copy
import functools
import json
import re

import datasets
import pytest
import torch
import trl
from conftest import make_trainer, read_metrics

STEPS, LR, MAX_GRAD_NORM, TOLERANCE = 4, 1.0, 1.0, 1e-5
# The squared losses have unbounded gradients (norms 10-100 here), so every step is clipped to max_grad_norm;
# at lr=1 that overshoots, the loss oscillates and rounding grows past 1e-5 (there our two layouts differ from
# each other by as much as from TRL). A smaller lr keeps their descent smooth; their beta keeps the loss O(1).
LR_OF = {"ipo": 0.1, "sppo_hard": 0.03}

# Short texts of different lengths: nothing is truncated (checked below), and
# the LD-DPO tail, the share_prompt layout and the padding all have work to do.
PAIRS = [
    ("2+2=", "4", "5"),
    ("Capital of France? ", "Paris", "Rome, surely"),
    ("Say hi: ", "hi there", "no"),
    ("3*3=", "9", "6 or 7"),
    ("Color of the sky? ", "blue", "green-ish"),
    ("Opposite of up: ", "down", "sideways"),
    ("1+1=", "2", "11"),
    ("Spell cat: ", "c-a-t", "k"),
]
EVAL_PAIR = ("5-1=", "4", "3")   # a prompt of its own: no train/eval overlap warning

# id -> (TRL's loss_type list, our loss=..., settings with TRL's names, which are our loss.<key> too)
CASES = {
    "sigmoid": (["sigmoid"], "sigmoid", {}),
    "hinge": (["hinge"], "hinge", {}),
    "ipo": (["ipo"], "ipo", {"beta": 0.5}),
    "exo_pair": (["exo_pair"], "exo_pair", {"label_smoothing": 1e-3}),
    "nca_pair": (["nca_pair"], "nca_pair", {}),
    "robust": (["robust"], "robust", {"label_smoothing": 0.1}),
    "bco_pair": (["bco_pair"], "bco_pair", {}),
    "sppo_hard": (["sppo_hard"], "sppo_hard", {"beta": 1.0}),
    "aot": (["aot"], "aot", {}),
    "aot_unpaired": (["aot_unpaired"], "aot_unpaired", {}),
    "apo_zero": (["apo_zero"], "apo_zero", {}),
    "apo_down": (["apo_down"], "apo_down", {}),
    "discopop": (["discopop"], "discopop", {}),
    "sft": (["sft"], "sft", {}),
    "sigmoid_norm": (["sigmoid_norm"], "sigmoid_norm", {}),
    "rpo": (["sigmoid", "sft"], "rpo", {}),
    "ld_alpha": (["sigmoid"], "sigmoid", {"ld_alpha": 0.5}),
    "js_divergence": (["sigmoid"], "sigmoid", {"f_divergence_type": "js_divergence"}),
    "use_weighting": (["sigmoid"], "sigmoid", {"use_weighting": True}),
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")

    def write(name, pairs):
        (folder / name).write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                           for p, c, r in pairs))
        return folder / name

    return write("train.jsonl", PAIRS), write("eval.jsonl", [EVAL_PAIR])


def token_rows(rows) -> set[tuple]:
    """(prompt, chosen, rejected) token ids of each pair, as a set."""
    return {(tuple(p), tuple(c), tuple(r)) for p, c, r in rows}


def run_ours(run_dir, data_files, loss: str, settings: dict, share_prompt: bool, lr: float):
    """Our trainer in-process, as `python train.py loss=... ...` would run it:
    (loss of each step from metrics.jsonl, the trainer after training, a copy
    of its policy's weights before the first step)."""
    train, eval_ = data_files
    trainer = make_trainer(
        run_dir, "dataset=jsonl", f"dataset.path={train}", f"dataset.eval_path={eval_}", "dataset.n_train=null",
        f"loss={loss}", *(f"loss.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()),
        "optimizer=SGD", "optimizer.momentum=0", "optimizer.weight_decay=0", f"lr={lr}", "scheduler=constant",
        "warmup_steps=0", f"max_steps={STEPS}", f"max_grad_norm={MAX_GRAD_NORM}", "batch_size=8",
        "gradient_accumulation_steps=1", "log_every=1", "eval_every=1000", "n_eval_generations=0",
        "device=cpu", "precision=fp32", "compile=false", f"share_prompt={str(share_prompt).lower()}")
    initial = copy.deepcopy(trainer.policy)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    losses = [m["loss/train"] for m in read_metrics(run_dir) if "loss/train" in m]
    return losses, trainer, initial


def run_trl(out_dir, policy, tokenizer, loss_type: list[str], settings: dict, lr: float, max_length: int):
    """TRL's DPOTrainer on copies of `policy` (trained, and the frozen
    reference): (loss of each step, TRL's tokenized train set)."""
    losses = []

    class Recording(trl.DPOTrainer):
        def compute_loss(self, *args, **kwargs):   # once per optimizer step here: no accumulation, no eval
            loss = super().compute_loss(*args, **kwargs)
            losses.append(loss.item())
            return loss

    datasets.disable_progress_bars()
    args = trl.DPOConfig(
        output_dir=str(out_dir), loss_type=loss_type, **settings, per_device_train_batch_size=len(PAIRS),
        gradient_accumulation_steps=1, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, max_steps=STEPS, max_length=max_length, bf16=False,
        fp16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    rows = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    trainer = Recording(model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy).eval().requires_grad_(False),
                        args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    scored = trainer.train_dataset
    return losses, token_rows(zip(scored["prompt_ids"], scored["chosen_ids"], scored["rejected_ids"]))


def test_every_trl_loss_type_has_a_case():
    """TRL's own list (DPOConfig.loss_type's help): a loss type TRL adds fails here until it has a case."""
    trl_types = set(re.findall(r"`'(\w+)'`", trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
    assert len(trl_types) == 15
    assert trl_types == {loss_type[0] for loss_type, _, _ in CASES.values() if len(loss_type) == 1}


@pytest.mark.slow   # about 3-10 s a case (19 of them) on the dev machine's 2 shared cores
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_per_step_loss_matches_trl(case, data_files, tmp_path):
    loss_type, loss, settings = CASES[case]
    lr = LR_OF.get(case, LR)
    ours = {}
    for share_prompt in (True, False):
        losses, trainer, initial = run_ours(tmp_path / f"ours_share_prompt_{share_prompt}", data_files, loss,
                                            settings, share_prompt, lr)
        assert trainer.share_prompt == (share_prompt and loss != "sft")   # the layout under test really ran
        assert len(losses) == STEPS
        ours[share_prompt] = losses
        if share_prompt:
            start, tokenizer, cfg = initial, trainer.tokenizer, trainer.cfg
            our_rows = token_rows((ex.prompt, ex.chosen, ex.rejected) for ex in trainer.train_stream.examples)
        else:   # same seed, same initial weights in both layouts
            assert all(torch.equal(a, b) for a, b in zip(initial.state_dict().values(), start.state_dict().values()))

    # Each text whole, EOS after each response: nothing truncated by us, nor by TRL's collator (max_length)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    eos = [tokenizer.eos_token_id]
    assert our_rows == token_rows((encode(p), encode(c) + eos, encode(r) + eos) for p, c, r in PAIRS)
    assert all(len(p) + max(len(c), len(r)) <= cfg.max_length for p, c, r in our_rows)
    theirs, trl_rows = run_trl(tmp_path / "trl", start, tokenizer, loss_type, settings, lr, cfg.max_length)
    assert trl_rows == our_rows, "TRL and prefopt score different token ids"
    assert len(theirs) == STEPS
    assert max(theirs) - min(theirs) > 100 * TOLERANCE, f"TRL's loss hardly moved: {theirs}"
    for share_prompt, losses in ours.items():
        diffs = [abs(a - b) for a, b in zip(losses, theirs)]
        assert max(diffs) <= TOLERANCE, (f"share_prompt={share_prompt}: ours {losses} vs TRL {theirs} "
                                         f"(largest difference {max(diffs):.2e})")
