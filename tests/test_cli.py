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
