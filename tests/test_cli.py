"""train.py as a user runs it: real subprocesses, real config files."""
import json

import pytest
from conftest import FAST, MICRO_MODEL, read_metrics, run_cli


def last(rows, key):
    return [r for r in rows if key in r][-1]


def test_readme_command_rmsprop_dpo_exactly_as_typed(tmp_path):
    """`python train.py optimizer=RMSprop lr=5e-7 loss=dpo max_steps=20`, with
    the default run dir under ./runs (cwd is a scratch folder)."""
    r = run_cli("optimizer=RMSprop", "lr=5e-7", "loss=dpo", "max_steps=20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "dpo_RMSprop_lr5e-07" in run_dir.name
    rows = read_metrics(run_dir)
    train = last(rows, "loss/train")
    assert train["step"] == 20 and train["lr"] == pytest.approx(5e-7)
    # RMSprop: one buffer (square_avg) the size of the parameters, plus step counters
    assert train["memory/optimizer_state/square_avg_bytes"] == train["memory/params_bytes"]
    assert "memory/optimizer_state/exp_avg_bytes" not in train
    cfg = (run_dir / "config.yaml").read_text()
    assert "name: RMSprop" in cfg and "lr: 5.0e-07" in cfg
    assert (run_dir / "wandb").is_dir()                        # offline wandb run inside the run dir
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step-20"
    assert not (tmp_path / "outputs").exists()


def test_misspelled_optimizer_is_one_line_with_valid_names(tmp_path):
    r = run_cli("optimizer=Adamw", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "unknown optimizer 'Adamw' (did you mean AdamW?)" in lines[0]
    for name in ("RMSprop", "SGD", "Adafactor", "adam_mini"):
        assert name in lines[0]


def test_misspelled_loss_is_one_line(tmp_path):
    r = run_cli("loss=dop", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "unknown loss 'dop' (did you mean dpo?)" in r.stderr


@pytest.mark.parametrize("loss", ["sft", "dpo", "ipo", "hinge"])
def test_one_short_run_per_loss(tmp_path, loss):
    r = run_cli(*FAST, *MICRO_MODEL, f"loss={loss}", "max_steps=3", "eval_every=3", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(tmp_path)
    assert last(rows, "loss/train")["step"] == 3
    assert json.loads((tmp_path / "checkpoints" / "step-3" / "prefopt_state.json").read_text())["step"] == 3


def test_sft_then_dpo_from_its_checkpoint(tmp_path):
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    common = [*FAST, *MICRO_MODEL, "max_steps=6", "eval_every=6"]
    assert run_cli(*common, "loss=sft", f"run_dir={sft_dir}").returncode == 0
    r = run_cli(*common, "loss=dpo", f"model.archive={sft_dir}", f"run_dir={dpo_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    sft_final = last(read_metrics(sft_dir), "loss/eval")
    dpo_start = [m for m in read_metrics(dpo_dir) if "loss/eval" in m][0]
    # DPO starts from the SFT weights: same eval log-probs of the chosen answers,
    # and policy == reference, so the implicit rewards start at exactly 0.
    assert dpo_start["step"] == 0
    assert dpo_start["logps_eval/chosen"] == pytest.approx(sft_final["logps_eval/chosen"], rel=1e-5)
    assert dpo_start["rewards_eval/margins"] == 0.0


def test_missing_archive_is_one_line(tmp_path):
    r = run_cli(*FAST, *MICRO_MODEL, f"model.archive={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model.archive=" in r.stderr and "Traceback" not in r.stderr


# The README's optimizer-keyword commands (and their kind): an optimizer
# keyword whose signature default is 0 (`momentum: float = 0`) takes 0.9.
README_KEYWORD_COMMANDS = [
    ["optimizer=SGD", "optimizer.momentum=0.9", "lr=0.05"],
    ["optimizer=RMSprop", "optimizer.momentum=0.9"],
    ["optimizer=Adam", "optimizer.weight_decay=0.01"],
    ["optimizer=SGD", "optimizer.dampening=0.0"],
]


@pytest.mark.parametrize("args", README_KEYWORD_COMMANDS, ids=" ".join)
def test_readme_optimizer_keywords_pass_the_command_line_check(tmp_path, monkeypatch, args):
    """In process, through the very function train.py calls before Hydra."""
    from prefopt import config_checks

    monkeypatch.chdir(tmp_path)
    config_checks.check_command_line(args)


@pytest.mark.parametrize("args", README_KEYWORD_COMMANDS, ids=" ".join)
def test_readme_optimizer_keywords_train(tmp_path, args):
    r = run_cli(*args, "max_steps=2", *FAST, *MICRO_MODEL, "eval_every=2", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = (tmp_path / "config.yaml").read_text()
    for arg in args[1:2]:
        key, value = arg.split("=")
        assert f"  {key.split('.')[1]}: {value}\n" in saved
    assert last(read_metrics(tmp_path), "loss/train")["step"] == 2


def test_a_list_keyword_keeps_its_length_and_item_types(tmp_path, monkeypatch):
    from prefopt import config_checks
    from utils import ConfigError

    monkeypatch.chdir(tmp_path)
    for value, kind in [("[0.9]", "[0.9]"), ("[0.9,0.99,0.999]", "[0.9, 0.99, 0.999]"), ("[0.9,high]", "[0.9, 'high']"),
                        ("0.9", "0.9")]:
        with pytest.raises(ConfigError) as e:
            config_checks.check_command_line([f"optimizer.betas={value}"])
        assert str(e.value) == f"optimizer.betas={kind} should be a list of 2 numbers (default: [0.9, 0.999])"
    config_checks.check_command_line(["optimizer.betas=[0.9,1]"])        # an int is a number
    with pytest.raises(ConfigError) as e:
        config_checks.check_command_line(["optimizer=SGD", "optimizer.momentum=high"])
    assert str(e.value) == "optimizer.momentum='high' should be a number (default: 0.0)"
