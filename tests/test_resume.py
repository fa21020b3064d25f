"""Exact resume: a run killed with SIGKILL mid-run and resumed writes the
same metrics, step for step, bit for bit, as a run never interrupted; SIGTERM
stops cleanly with a checkpoint; a damaged checkpoint falls back to the
previous one. Real subprocesses, not function calls."""
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, read_metrics, run_cli

# Timing and process-memory fields legitimately differ between two processes.
NOT_REPRODUCIBLE = {"tokens_per_s", "memory/peak_bytes"}
RUN = ["wandb.mode=disabled", "loss=sft", "max_steps=40", "save_every=5", "log_every=3", "eval_every=8",
       "n_eval_examples=32", "n_eval_generations=8", "dataset.n_train=512"]


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in NOT_REPRODUCIBLE} for r in rows]


def start(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir, proc, min_step, timeout=120):
    latest = run_dir / "checkpoints" / "LATEST"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest.is_file() and int(latest.read_text().strip().split("-")[1]) >= min_step:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("extra", [["optimizer=AdamW"], ["optimizer=adam_mini"],
                                   # TR-DPO: the reference moves (every 4 steps), so checkpoints carry it
                                   ["optimizer=AdamW", "loss=dpo", "loss.sync_ref_model=true",
                                    "loss.ref_model_sync_steps=4"],
                                   # LoRA: the checkpoint holds the adapters only; the base is rebuilt
                                   ["optimizer=AdamW", "loss=dpo", "peft=lora"]],
                         ids=["AdamW", "adam_mini", "tr_dpo", "lora"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, extra):
    args = [*RUN, *extra]
    whole = run_cli(*args, f"run_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = start(*args, f"run_dir={killed}")
    wait_for_checkpoint(killed, proc, min_step=10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = max(r["step"] for r in read_metrics(killed))
    assert steps_before < 40, "the run finished before it could be killed"

    resumed = run_cli(*args, f"run_dir={killed}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert comparable(read_metrics(killed)) == comparable(read_metrics(tmp_path / "whole"))


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(*RUN, f"run_dir={run_dir}")
    wait_for_checkpoint(run_dir, proc, min_step=5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "Resume with: python train.py" in err and "resume=true" in err
    stopped_at = int((run_dir / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    assert 5 <= stopped_at < 40
    assert json.loads((run_dir / "checkpoints" / f"step-{stopped_at}" / "prefopt_state.json").read_text())["step"] \
        == stopped_at
    r = run_cli(*RUN, f"run_dir={run_dir}", "resume=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert max(m["step"] for m in read_metrics(run_dir)) == 40


def test_damaged_checkpoint_falls_back_to_previous(tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, "max_steps=10", f"run_dir={run_dir}"]
    assert run_cli(*args).returncode == 0
    weights = run_dir / "checkpoints" / "step-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])                 # truncated: a damaged file
    r = run_cli(*RUN, "max_steps=12", f"run_dir={run_dir}", "resume=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step-10 is damaged" in r.stderr and "resumed from" in r.stderr and "step-5 at step 5" in r.stderr


def test_keep_last_prunes_old_checkpoints(tmp_path):
    assert run_cli(*RUN, "max_steps=15", "keep_last=2", f"run_dir={tmp_path}").returncode == 0
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["LATEST", "step-10", "step-15"]


def test_resume_without_checkpoint_is_one_line(tmp_path):
    r = run_cli(*RUN, f"run_dir={tmp_path}", "resume=true")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "has no checkpoint" in r.stderr
