"""trainer=fsdp on CPU: 2 processes (torchrun, gloo) against the basic trainer
on the same data and seed. Real launches, kept few and tiny: one AdamW run
serves the equivalence, memory, resume and export checks."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import FAST, MICRO_MODEL, ROOT, make_trainer, read_metrics

from utils import ConfigError

RUN = [*FAST, *MICRO_MODEL, "loss=dpo", "eval_every=2"]
LOSSES_AND_REWARDS = ("loss/train", "loss/eval", "rewards_train/chosen", "rewards_train/rejected",
                      "rewards_train/accuracies", "rewards_train/margins", "rewards_eval/chosen",
                      "rewards_eval/rejected", "rewards_eval/accuracies", "rewards_eval/margins")
NOT_REPRODUCIBLE = ("tokens_per_s", "memory/peak_bytes", "memory/peak_bytes_per_rank")


def torchrun(*args: str, script=ROOT / "train.py", timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def basic_run(run_dir, *overrides):
    trainer = make_trainer(run_dir, *overrides)
    trainer.train()
    trainer.cleanup()
    return read_metrics(run_dir)


def assert_same_metrics(fsdp_rows, basic_rows):
    """Losses and rewards within 1e-5; log-probs (sums over ~40 tokens, about
    -40) and gradient norms relative to their size."""
    assert [r["step"] for r in fsdp_rows] == [r["step"] for r in basic_rows]
    for f, b in zip(fsdp_rows, basic_rows):
        for key in LOSSES_AND_REWARDS:
            if key in b:
                assert f[key] == pytest.approx(b[key], abs=1e-5, rel=0), (f["step"], key)
        for key in ("logps_train/chosen", "logps_train/rejected", "logps_eval/chosen", "logps_eval/rejected",
                    "grad_norm"):
            if key in b:
                assert f[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (f["step"], key)


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """torchrun --nproc_per_node=2 train.py trainer=fsdp: 4 AdamW steps,
    checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "adamw"
    torchrun("trainer=fsdp", *RUN, "optimizer=AdamW", "max_steps=4", "save_every=2", f"run_dir={run_dir}")
    return run_dir


def test_adamw_matches_basic_and_shards_its_state(adamw_run, tmp_path):
    fsdp_rows = read_metrics(adamw_run)
    basic_rows = basic_run(tmp_path, *RUN, "optimizer=AdamW", "max_steps=4")
    assert_same_metrics(fsdp_rows, basic_rows)
    train = [r for r in fsdp_rows if "loss/train" in r]
    basic_train = [r for r in basic_rows if "loss/train" in r]
    for f, b in zip(train, basic_train):
        # Each of the 2 ranks holds about half of the single-process state (the
        # shards of a tensor with an odd number of rows differ by one row).
        per_rank, whole = f["memory/optimizer_state_bytes_per_rank"], b["memory/optimizer_state_bytes"]
        assert 0.49 * whole <= per_rank <= 0.52 * whole
        assert f["memory/optimizer_state_bytes"] == pytest.approx(whole, rel=0.01)
        assert 0.49 * b["memory/params_bytes"] <= f["memory/params_bytes_per_rank"] <= 0.52 * b["memory/params_bytes"]
        assert f["memory/optimizer_state/exp_avg_bytes"] == pytest.approx(b["memory/optimizer_state/exp_avg_bytes"],
                                                                           rel=0.01)


def test_adam_mini_matches_basic_with_accumulation_and_checkpointing(tmp_path):
    """Adam-mini's per-head and per-tensor second moments are means over whole
    blocks (summed over both ranks); also gradient accumulation without
    intermediate reduce and per-block activation checkpointing."""
    args = [*RUN, "optimizer=adam_mini", "max_steps=3"]
    torchrun("trainer=fsdp", *args, "gradient_accumulation_steps=2", "trainer.activation_checkpointing=true",
             f"run_dir={tmp_path / 'fsdp'}")
    assert_same_metrics(read_metrics(tmp_path / "fsdp"), basic_run(tmp_path / "basic", *args))


def resume_from_step_2(run_dir, tmp_path, *overrides):
    """A copy of a finished 4-step FSDP run cut back to its step-2 checkpoint,
    resumed with 2 ranks the way a user without torchrun would; the resumed
    run dir and the launch's stderr. Its metrics must equal the original's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    (resumed / "checkpoints" / "LATEST").write_text("step-2\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer=fsdp", "trainer.nproc=2", *overrides,
                        f"run_dir={resumed}", "resume=true"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "step-2 at step 2 (2 ranks)" in r.stderr

    def comparable(rows):
        return [{k: v for k, v in row.items() if k not in NOT_REPRODUCIBLE} for row in rows]

    assert comparable(read_metrics(resumed)) == comparable(read_metrics(run_dir))
    return resumed


def test_resume_with_two_ranks_continues_identically(adamw_run, tmp_path):
    """Save with 2 ranks (step 2), resume with 2 ranks: the metrics equal the
    uninterrupted run's."""
    resumed = resume_from_step_2(adamw_run, tmp_path, *RUN, "optimizer=AdamW", "max_steps=4", "save_every=2")
    assert sorted(p.name for p in (resumed / "checkpoints" / "step-4" / "dcp").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_export_loads_in_basic_trainer_and_transformers(adamw_run, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = adamw_run / "checkpoints" / "step-4"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) > 0
    # the basic trainer starting from the FSDP run: its policy at step 0 is the
    # FSDP policy at step 4, so the held-out log-probs agree
    trainer = make_trainer(tmp_path, *RUN, f"model.archive={adamw_run}")
    metrics = trainer.evaluate()
    trainer.cleanup()
    final = [r for r in read_metrics(adamw_run) if "loss/eval" in r][-1]
    for key in ("logps_eval/chosen", "logps_eval/rejected"):
        assert metrics[key] == pytest.approx(final[key], rel=1e-6)


def test_every_supported_optimizer_matches_basic_under_fsdp(tmp_path):
    from prefopt import optim as optimizers

    out = tmp_path / "sweep.json"
    names = [n for n in optimizers.fsdp_supported() if n not in ("AdamW", "adam_mini")]
    torchrun(str(out), json.dumps([*FAST, *MICRO_MODEL, "loss=dpo"]), *names,
             script=ROOT / "tests" / "fsdp_optimizer_sweep.py")
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(names)
    for name, r in results.items():
        for key in ("loss/eval", "rewards_eval/margins"):
            assert r["fsdp"][key] == pytest.approx(r["basic"][key], abs=1e-5), (name, key)
        assert r["fsdp"]["logps_eval/chosen"] == pytest.approx(r["basic"]["logps_eval/chosen"], rel=1e-5), name


@pytest.mark.parametrize("optimizer, reason", [
    ("Adafactor", "whole weight matrix"),
    ("Muon", "whole weight matrices"),
    ("Rprop", "index_put_"),
    ("Lion", "not been verified on sharded parameters"),   # any registry name not verified under FSDP
])
def test_optimizers_that_cannot_shard_are_refused_in_one_line(tmp_path, optimizer, reason):
    from prefopt import optim as optimizers

    if optimizers.find_entry(optimizer) is None or optimizers.find_entry(optimizer).refuse:
        pytest.skip(f"{optimizer} is not available here")
    with pytest.raises(ConfigError) as e:
        make_trainer(tmp_path, "trainer=fsdp", f"optimizer={optimizer}")
    message = str(e.value)
    assert "\n" not in message and f"optimizer={optimizer} cannot train under trainer=fsdp" in message
    assert reason in message and "trainer=basic" in message


def test_bf16_on_cpu_is_refused_in_one_line(tmp_path):
    """bf16 *storage* (precision=bf16) on CPU is refused before any process
    starts, whatever the compute dtype: a whole run at bf16 matmul speed looks
    hung. bf16 *compute* (trainer.mixed_precision=bf16 over fp32 storage) is
    an opt-in for testing the GPU path: tests/test_fsdp_gpu_paths.py."""
    for compute in ("auto", "bf16"):
        with pytest.raises(ConfigError, match="^precision=bf16 on CPU is far slower than fp32") as e:
            make_trainer(tmp_path, "trainer=fsdp", "precision=bf16", f"trainer.mixed_precision={compute}",
                         "device=cpu")
        assert "\n" not in str(e.value)



# Ten steps with optimizer.weight_decay=0.1 for every optimizer FSDP runs, some
# with a setting that gives their state more to shard (AMSGrad's running max,
# momentum buffers, ASGD averaging from step 3), compared with trainer=basic
# on the whole weights and optimizer state, not only on the evaluation.
DECAY_STEPS = 10
DECAY_SWEEP = {"AdamW": [], "adam_mini": [], "ASGD": ["optimizer.t0=2"], "Adadelta": [], "Adagrad": [],
               "Adam": ["optimizer.amsgrad=true"], "Adamax": [], "NAdam": [], "RAdam": [],
               "RMSprop": ["optimizer.centered=true"], "SGD": ["optimizer.momentum=0.9"]}
WEIGHT_TOL = 1e-5
STATE_RTOL = 1e-3


@pytest.fixture(scope="module")
def decay_sweep(tmp_path_factory):
    """One launch: tests/fsdp_decay_sweep.py, all of DECAY_SWEEP."""
    out = tmp_path_factory.mktemp("fsdp_decay")
    torchrun(str(out), json.dumps([*FAST, *MICRO_MODEL, "loss=dpo"]), str(DECAY_STEPS), json.dumps(DECAY_SWEEP),
             script=ROOT / "tests" / "fsdp_decay_sweep.py")
    return out


@pytest.mark.parametrize("name", DECAY_SWEEP)
def test_fsdp_matches_basic_over_ten_steps_with_weight_decay(decay_sweep, name):
    """Whole weights within WEIGHT_TOL = 1e-5 of trainer=basic after 10 steps
    with weight_decay=0.1. Measured (2 gloo ranks against 1 process, fp32):
    FSDP and basic differ by at most 1.7e-6 (RMSprop centered; Adagrad 1.1e-6,
    the Adam family and adam_mini 0.8-1.2e-6, SGD, ASGD, Adadelta, RAdam
    <= 2e-8), so the tolerance is >= 5x the reduction-order noise. Leaving
    decay out changes the weights by >= 9.2e-5 (AdamW and adam_mini: decoupled,
    lr*wd*steps*|w| = 1e-3*0.1*10*0.09; the L2-style ones by 3.9e-4 (RAdam) to
    0.03), >= 9x the tolerance; this is checked below on every run (with a
    basic run without decay), as is that the weights moved far more than the
    tolerance (least: RAdam, 3.4e-4, its first steps are unadapted). Optimizer
    state within 1e-3 of its largest element (measured <= 3.2e-5, RMSprop's
    grad_avg; <= 6e-6 for the rest)."""
    import torch

    r = torch.load(decay_sweep / f"{name}.pt", weights_only=True)
    fsdp, basic, no_decay = r["fsdp"], r["basic"], r["no_decay"]
    assert r["steps"] == DECAY_STEPS and list(fsdp["weights"]) == list(basic["weights"])

    def largest(a, b):
        return max((a[n] - b[n]).abs().max().item() for n in b)

    # the comparison can see what it is meant to see
    for n in basic["init"]:
        assert torch.equal(fsdp["init"][n], basic["init"][n]), f"{name}: {n} starts differently"
    moved, decay = largest(basic["weights"], basic["init"]), largest(basic["weights"], no_decay)
    assert moved > 20 * WEIGHT_TOL, f"{name}: the weights moved only {moved:.2g} in {DECAY_STEPS} steps"
    assert decay > 5 * WEIGHT_TOL, f"{name}: weight decay changed the weights by only {decay:.2g}"

    for n, b in basic["weights"].items():
        diff = (fsdp["weights"][n] - b).abs().max().item()
        assert diff <= WEIGHT_TOL, (f"{name}: {n} differs from trainer=basic by {diff:.3g} after {DECAY_STEPS} steps "
                                    f"(tolerance {WEIGHT_TOL:g}; leaving weight decay out moves it {decay:.3g})")
    for n, state in basic["state"].items():
        assert sorted(fsdp["state"][n]) == sorted(state), (name, n)
        for key, b in state.items():
            f = fsdp["state"][n][key]
            b, f = torch.as_tensor(b, dtype=torch.float64), torch.as_tensor(f, dtype=torch.float64)
            assert f.shape == b.shape, (name, n, key, f.shape, b.shape)
            diff, scale = (f - b).abs().max().item(), b.abs().max().item()
            assert diff <= STATE_RTOL * scale, f"{name}: state {key} of {n} differs by {diff:.3g} (largest {scale:.3g})"
    for key in ("loss/eval", "rewards_eval/margins"):
        assert fsdp["eval"][key] == pytest.approx(basic["eval"][key], abs=1e-5, rel=0), (name, key)


@pytest.mark.parametrize("loss, basic_extra", [
    # TR-DPO's reference mixing runs on each rank's shards; WPO and LD-DPO on each rank's pairs
    (["loss=dpo", "loss.sync_ref_model=true", "loss.ref_model_sync_steps=2", "loss.use_weighting=true",
      "loss.ld_alpha=0.5"], []),
    # KTO's KL estimate is per micro-batch: the basic trainer splits the batch in two as the 2 ranks do
    (["loss=kto"], ["gradient_accumulation_steps=2"]),
], ids=["tr_dpo_wpo_ld", "kto"])
def test_loss_family_matches_basic(tmp_path, loss, basic_extra):
    run = [*RUN, *loss, "optimizer=AdamW", "max_steps=4"]
    torchrun("trainer=fsdp", *run, f"run_dir={tmp_path / 'fsdp'}")
    fsdp_train = [r for r in read_metrics(tmp_path / "fsdp") if "loss/train" in r]
    basic_train = [r for r in basic_run(tmp_path / "basic", *run, *basic_extra) if "loss/train" in r]
    assert len(fsdp_train) == len(basic_train) == 4
    for f, b in zip(fsdp_train, basic_train):
        for key in ("loss/train", "rewards_train/chosen", "rewards_train/rejected", "kl/train"):
            if key in b:
                assert f[key] == pytest.approx(b[key], abs=1e-5, rel=0), (f["step"], key)


# peft=lora under trainer=fsdp: the adapters sit in the sharded decoder blocks
# next to the frozen base weights; the reference is the same sharded model
# with its adapters disabled. lr=1e-2 so that 4 steps move the adapters (LoRA's
# B starts at zero) well beyond the tolerances below.
LORA_RUN = [*RUN, "peft=lora", "peft.r=4", "peft.alpha=8", "lr=1e-2", "max_steps=4", "save_every=2"]
# What each rank holds 1/2 of (the rest, step counters and Adam-mini's
# per-block second moments, is the same on every rank).
SHARDED_STATE = {"AdamW": ("exp_avg", "exp_avg_sq"), "adam_mini": ("exp_avg",)}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """{optimizer: (fsdp run dir, basic run dir)}, each launched once: 4 steps,
    checkpoints at steps 2 and 4."""
    runs = {}

    def get(optimizer):
        if optimizer not in runs:
            root = tmp_path_factory.mktemp(f"fsdp_lora_{optimizer}")
            torchrun("trainer=fsdp", *LORA_RUN, f"optimizer={optimizer}", f"run_dir={root / 'fsdp'}")
            basic_run(root / "basic", *LORA_RUN, f"optimizer={optimizer}")
            runs[optimizer] = (root / "fsdp", root / "basic")
        return runs[optimizer]

    return get


@pytest.mark.parametrize("optimizer", SHARDED_STATE)
def test_lora_matches_basic_and_shards_the_adapters(lora_runs, optimizer):
    fsdp_dir, basic_dir = lora_runs(optimizer)
    fsdp_rows, basic_rows = read_metrics(fsdp_dir), read_metrics(basic_dir)
    assert_same_metrics(fsdp_rows, basic_rows)   # every step's train losses and rewards, and every eval
    train = [r for r in fsdp_rows if "loss/train" in r]
    basic_train = [r for r in basic_rows if "loss/train" in r]
    assert len(train) == 4
    assert abs(basic_train[-1]["rewards_train/margins"]) > 100 * 1e-5, "the adapters did not train"
    for f, b in zip(train, basic_train):
        trainable = b["memory/params_trainable_bytes"]
        assert 0 < trainable < b["memory/params_bytes"] / 10 and b["memory/reference_params_bytes"] == 0
        assert f["memory/params_trainable_bytes"] == f["memory/grads_bytes"] == trainable
        assert f["memory/params_trainable_bytes_per_rank"] == f["memory/grads_bytes_per_rank"] == trainable // 2
        assert f["memory/reference_params_bytes"] == 0
        sharded = sum(b[f"memory/optimizer_state/{k}_bytes"] for k in SHARDED_STATE[optimizer])
        # each rank: half of the adapters' moments, plus what every rank keeps whole
        assert f["memory/optimizer_state_bytes_per_rank"] == sharded // 2 + b["memory/optimizer_state_bytes"] - sharded
        assert f["memory/optimizer_state_bytes_per_rank"] < 0.6 * b["memory/optimizer_state_bytes"]


def test_lora_checkpoint_holds_the_basic_runs_adapters(lora_runs, tmp_path):
    """PEFT's files, gathered by rank 0: the same adapters as trainer=basic's
    after the same steps (1e-6); the basic trainer loads them and evaluates
    as the FSDP run did."""
    from safetensors.torch import load_file

    from prefopt import adapters

    fsdp_dir, basic_dir = lora_runs("AdamW")
    ckpt = fsdp_dir / "checkpoints" / "step-4"
    assert not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    ours, theirs = (load_file(d / "checkpoints" / "step-4" / adapters.ADAPTER_WEIGHTS) for d in (fsdp_dir, basic_dir))
    assert sorted(ours) == sorted(theirs) and any("lora_B" in k for k in ours)
    assert max(theirs[k].abs().max().item() for k in theirs if "lora_B" in k) > 1e-3   # B started at zero
    for k in theirs:
        diff = (ours[k] - theirs[k]).abs().max().item()
        assert ours[k].shape == theirs[k].shape and diff <= 1e-6, (k, diff)   # measured: 2e-7
    trainer = make_trainer(tmp_path, *LORA_RUN, "optimizer=AdamW")
    adapters.load_adapter_weights(trainer.policy, ckpt)
    metrics = trainer.evaluate()
    trainer.cleanup()
    final = [r for r in read_metrics(fsdp_dir) if "loss/eval" in r][-1]
    for key in ("logps_eval/chosen", "logps_eval/rejected", "rewards_eval/margins"):
        assert metrics[key] == pytest.approx(final[key], rel=1e-6, abs=1e-6), key


def test_lora_resume_continues_identically(lora_runs, tmp_path):
    """Resume the FSDP LoRA run from its step-2 checkpoint (adapters and
    optimizer from dcp/), started without torchrun: the metrics and the final
    adapters equal the uninterrupted run's."""
    from safetensors.torch import load_file

    fsdp_dir, _ = lora_runs("AdamW")
    resumed = resume_from_step_2(fsdp_dir, tmp_path, *LORA_RUN, "optimizer=AdamW")
    ours, theirs = (load_file(d / "checkpoints" / "step-4" / "adapter_model.safetensors") for d in (resumed, fsdp_dir))
    assert all(ours[k].equal(theirs[k]) for k in theirs)


def test_lora_merged_export_is_refused_under_fsdp_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_trainer(tmp_path, "trainer=fsdp", "peft=lora", "export.merged=true")
    assert "\n" not in str(e.value) and "export.merged=true is not available under trainer=fsdp" in str(e.value)
