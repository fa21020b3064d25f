"""Comparing optimizers: a Hydra multirun sweep in one wandb group, compare.py's
table/JSON/PNG checked against the metrics files, and the update-sparsity
metric checked against an independent count."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, MICRO_MODEL, ROOT, read_metrics, run_cli

sys.path.insert(0, str(ROOT))
import compare  # noqa: E402

SWEEP_ARGS = [*FAST, *MICRO_MODEL, "wandb.mode=offline", "loss=dpo", "max_steps=4", "log_every=2", "eval_every=2",
              "metrics.update_sparsity=true"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`python train.py -m optimizer=SGD,RMSprop ...`: two tiny real runs."""
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "my_sweep"
    r = run_cli("-m", "optimizer=SGD,RMSprop", *SWEEP_ARGS, f"hydra.sweep.dir={sweep_dir}",
                cwd=tmp_path_factory.mktemp("cwd"))
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep_dir


def run_dirs(sweep_dir):
    return sorted(p for p in Path(sweep_dir).iterdir() if (p / "metrics.jsonl").is_file())


# ------------------------------------------------------------------ multirun

def wandb_run_records(run_dir):
    """The `run` records of an offline wandb run file (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:   # zero padding to the end of the block
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):              # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                yield record.run


def test_multirun_two_run_dirs_one_wandb_group(sweep):
    runs = run_dirs(sweep)
    assert [p.name for p in runs] == ["0_dpo_SGD_lr0.1", "1_dpo_RMSprop_lr0.0003"]
    for run, opt in zip(runs, ["SGD", "RMSprop"]):
        saved = compare.read_config(run)
        assert saved["optimizer"]["name"] == opt and saved["run_dir"] == str(run)
        assert saved["wandb"]["group"] == "my_sweep"               # the sweep dir's name
        assert {f"optimizer:{opt}", f"lr:{saved['lr']}", "loss:dpo", "model:tiny"} <= set(saved["wandb"]["tags"])
        (record,) = list(wandb_run_records(run))                    # what wandb itself recorded
        assert record.run_group == "my_sweep"
        assert f"optimizer:{opt}" in record.tags and "loss:dpo" in record.tags
        assert read_metrics(run)[-1]["step"] == 4


def test_explicit_wandb_group_wins_and_single_runs_have_no_group(tmp_path):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from prefopt import sweeps

    class Hydra:
        def __init__(self, mode):
            self.mode, self.sweep = mode, OmegaConf.create({"dir": "runs/sweep_x"})

    def cfg(group, tags=()):
        return OmegaConf.create({"lr": 0.1, "optimizer": {"name": "SGD"}, "loss": {"name": "dpo"},
                                 "model": {"name": "tiny"}, "wandb": {"group": group, "tags": list(tags)}})

    c = cfg(None)
    sweeps.wandb_group_and_tags(c, Hydra(RunMode.MULTIRUN))
    assert c.wandb.group == "sweep_x"
    c = cfg("mine", ["keep", "loss:dpo"])
    sweeps.wandb_group_and_tags(c, Hydra(RunMode.MULTIRUN))
    assert c.wandb.group == "mine" and list(c.wandb.tags) == ["keep", "loss:dpo", "optimizer:SGD", "lr:0.1", "model:tiny"]
    c = cfg(None)
    sweeps.wandb_group_and_tags(c, Hydra(RunMode.RUN))
    assert c.wandb.group is None


def test_misspelled_value_in_a_sweep_list_is_one_line(tmp_path):
    r = run_cli("-m", "optimizer=SGD,Adamw", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "unknown optimizer 'Adamw' (did you mean AdamW?)" in r.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ compare.py

def independent_summary(run_dir):
    """What the table must say, read straight from the files."""
    import yaml

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "loss/eval" in r]
    logs = [r for r in rows if "tokens_per_s" in r]
    n_params = logs[-1]["memory/params_bytes"] // 4           # fp32 parameters
    return {
        "optimizer": cfg["optimizer"]["name"], "lr": cfg["lr"], "loss": "dpo",
        "eval_loss": evals[-1]["loss/eval"], "best_eval_loss": min(r["loss/eval"] for r in evals),
        "reward_acc": evals[-1]["rewards_eval/accuracies"], "reward_margin": evals[-1]["rewards_eval/margins"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in logs) / len(logs),
        "state_bytes": logs[-1]["memory/optimizer_state_bytes"],
        "state_bytes_per_param": logs[-1]["memory/optimizer_state_bytes"] / n_params,
        "peak_bytes": max(r["memory/peak_bytes"] for r in logs),
        "sparsity_bf16": logs[-1]["update/sparsity"], "sparsity_exact": logs[-1]["update/sparsity_exact"],
        "chosen_drift": evals[-1]["logps_eval/chosen"] - evals[0]["logps_eval/chosen"],
        "greedy_acc": evals[-1]["generate_eval/accuracy"],
    }


def test_json_and_table_equal_the_metrics_files(sweep, capsys, tmp_path):
    runs = run_dirs(sweep)
    # the first eval loss (step 0, policy == reference) is ln 2; target just below it is reached at step 2 or 4
    target = 0.693
    assert compare.main([str(r) for r in runs] + ["--json", "--target-loss", str(target),
                                                  "--plot", str(tmp_path / "c.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in out["runs"]] == [p.name for p in runs]
    for row, run in zip(out["runs"], runs):
        expected = independent_summary(run)
        for key, value in expected.items():
            assert row[key] == value, key
        evals = [r for r in read_metrics(run) if "loss/eval" in r]
        reached = [r["step"] for r in evals if r["loss/eval"] <= target]
        assert row["steps_to_target"] == (reached[0] if reached else None)
    sgd, rms = out["runs"]
    assert sgd["state_bytes"] == 0 and rms["state_bytes_per_param"] == pytest.approx(4.0, abs=0.01)

    # the text table: one line per run, every number as in the files (to its printed precision)
    assert compare.main([str(sweep), "--no-plot", "--target-loss", "0.1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "optimizer", "lr", "loss"] and "steps_to_0.1" in header
    assert len(lines) == 2 + len(runs)
    for line, run in zip(lines[2:], runs):
        cells = dict(zip(header, line.split()))
        expected = independent_summary(run)
        assert cells["run"] == run.name and cells["optimizer"] == expected["optimizer"]
        assert float(cells["lr"]) == expected["lr"]
        for col, key, tol in [("eval_loss", "eval_loss", 5e-5), ("best_eval_loss", "best_eval_loss", 5e-5),
                              ("reward_acc", "reward_acc", 5e-4), ("reward_margin", "reward_margin", 5e-5),
                              ("chosen_drift", "chosen_drift", 5e-4), ("greedy_acc", "greedy_acc", 5e-4),
                              ("tokens_per_s", "tokens_per_s", 0.5), ("state_B/param", "state_bytes_per_param", 5e-4),
                              ("sparsity_bf16", "sparsity_bf16", 5e-7), ("sparsity_exact", "sparsity_exact", 5e-7)]:
            assert float(cells[col]) == pytest.approx(expected[key], abs=tol), col
        assert int(cells["state_bytes"].replace(",", "")) == expected["state_bytes"]
        assert float(cells["peak_MiB"]) == pytest.approx(expected["peak_bytes"] / 2 ** 20, abs=0.05)
        assert cells["steps_to_0.1"] == "n/a"                     # a 4-step run never gets there


def test_png_exists_and_is_not_blank(sweep):
    r = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(sweep)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    png = sweep / "compare.png"                                   # the default: <sweep>/compare.png
    assert f"plot: {png}" in r.stdout
    assert png.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 900
    colours = torch.from_numpy(pixels.reshape(-1, pixels.shape[-1]).copy()).unique(dim=0)
    assert len(colours) > 20                                      # curves, text and axes, not one colour


@pytest.mark.parametrize("what", ["empty dir", "dir of files", "missing", "a file", "half a run"])
def test_refuses_what_is_not_a_run(tmp_path, what):
    target = tmp_path / "x"
    if what == "empty dir":
        target.mkdir()
    elif what == "dir of files":
        target.mkdir()
        (target / "notes.txt").write_text("hi")
        (target / "sub").mkdir()
    elif what == "a file":
        target.write_text("hi")
    elif what == "half a run":
        target.mkdir()
        (target / "metrics.jsonl").write_text('{"step": 0}\n')     # no config.yaml
    r = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(target)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {target}")
    assert not list(tmp_path.rglob("*.png"))


def test_a_run_restarted_in_the_same_dir_counts_once(tmp_path, capsys):
    """Without resume=true a second run in the same run dir appends from step 0."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("lr: 0.1\nprecision: fp32\nloss: {name: dpo}\noptimizer: {name: SGD, momentum: 0.9}\n")
    old = [{"step": 0, "loss/eval": 0.69}, {"step": 5, "loss/eval": 0.1}]
    new = [{"step": 0, "loss/eval": 0.69}, {"step": 2, "tokens_per_s": 10.0, "memory/params_bytes": 400,
            "memory/optimizer_state_bytes": 400, "memory/peak_bytes": 2 ** 20}, {"step": 2, "loss/eval": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old + new))
    assert compare.main([str(run), "--json", "--no-plot"]) == 0
    captured = capsys.readouterr()
    (row,) = json.loads(captured.out)["runs"]
    assert "holds 2 runs" in captured.err
    assert row["best_eval_loss"] == 0.4 and row["steps"] == 2 and row["steps_to_target"] == 2
    assert row["optimizer"] == "SGD(momentum=0.9)" and row["params"] == 100 and row["state_bytes_per_param"] == 4.0
    assert row["reward_acc"] is None and row["sparsity_bf16"] is None


# ------------------------------------------------------------------ update sparsity

def counted_sparsity(before, after):
    """An independent count: elements equal before/after, in bf16 and exactly."""
    same_bf16 = sum(int((a.bfloat16() == b.bfloat16()).sum()) for a, b in zip(after, before))
    same_exact = sum(int((a == b).sum()) for a, b in zip(after, before))
    n = sum(a.numel() for a in after)
    return same_bf16 / n, same_exact / n


def train_and_count(trainer):
    """Train, keeping a copy of the parameters at the start and after every
    log step (the window boundaries); return the logged rows and our counts."""
    copies = [[p.detach().clone() for p in trainer.policy.parameters()]]
    log_window = trainer.log_window

    def spy(*args, **kwargs):
        logged = log_window(*args, **kwargs)
        copies.append([p.detach().clone() for p in trainer.policy.parameters()])
        return logged

    trainer.log_window = spy
    trainer.train()
    rows = [r for r in read_metrics(trainer.run_dir) if "tokens_per_s" in r]
    return rows, [counted_sparsity(a, b) for a, b in zip(copies, copies[1:])]


SPARSITY_RUN = ["max_steps=4", "log_every=2", "eval_every=100", "metrics.update_sparsity=true"]


def test_sparsity_is_one_with_lr_zero(micro_trainer):
    rows, counts = train_and_count(micro_trainer("optimizer=AdamW", "lr=0", *SPARSITY_RUN))
    assert [r["step"] for r in rows] == [2, 4]
    for row, (bf16, exact) in zip(rows, counts):
        assert row["update/sparsity"] == row["update/sparsity_exact"] == 1.0
        assert bf16 == exact == 1.0


@pytest.mark.parametrize("optimizer,lr", [("AdamW", "1e-3"), ("SGD", "0.1")])
def test_sparsity_matches_an_independent_count(micro_trainer, optimizer, lr):
    rows, counts = train_and_count(micro_trainer(f"optimizer={optimizer}", f"lr={lr}", *SPARSITY_RUN))
    assert [r["step"] for r in rows] == [2, 4] and len(counts) == 2   # each window starts where the last ended
    for row, (bf16, exact) in zip(rows, counts):
        assert row["update/sparsity"] == bf16 and row["update/sparsity_exact"] == exact
        assert exact <= bf16 < 1.0


def test_sparsity_off_costs_nothing(micro_trainer):
    trainer = micro_trainer("optimizer=AdamW", "max_steps=2", "log_every=2", "eval_every=100")
    assert trainer.sparsity is None                                 # no snapshot, no copy, nothing per step
    rows, _ = train_and_count(trainer)
    assert rows and not any(k.startswith("update/") for r in rows for k in r)


# ------------------------------------------------------------------ loss comparison columns

def fake_run(parent, name, loss, evals, opt="AdamW"):
    """A run dir with the given `loss` config node and eval rows (plus one log row)."""
    import yaml

    run = parent / name
    run.mkdir()
    cfg = {"lr": 3e-4, "precision": "fp32", "loss": loss, "optimizer": {"name": opt}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 0, **evals[0]}, {"step": 5, "tokens_per_s": 100.0, "memory/params_bytes": 400,
                                      "memory/optimizer_state_bytes": 800, "memory/peak_bytes": 2 ** 20}]
    rows += [{"step": 5 * i, **e} for i, e in enumerate(evals[1:], 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


PAIRED = {"rewards_eval/accuracies": 0.75, "rewards_eval/margins": 0.5}


@pytest.fixture
def loss_sweep(tmp_path):
    sweep = tmp_path / "losses"
    sweep.mkdir()
    fake_run(sweep, "0_dpo", {"name": "dpo", "beta": 0.1}, [
        {"loss/eval": 0.693, "logps_eval/chosen": -12.5, "generate_eval/accuracy": 0.25, **PAIRED},
        {"loss/eval": 0.6, "logps_eval/chosen": -13.0, "generate_eval/accuracy": 0.5, **PAIRED},
        {"loss/eval": 0.4, "logps_eval/chosen": -14.75, "generate_eval/accuracy": 0.625,
         "rewards_eval/accuracies": 0.875, "rewards_eval/margins": 1.25}])
    fake_run(sweep, "1_kto", {"name": "kto", "beta": 0.1}, [           # unpaired: no accuracies or margins
        {"loss/eval": 0.5, "logps_eval/chosen": -12.5, "logps_eval/rejected": -13.0, "kl/eval": 0.0,
         "generate_eval/accuracy": 0.25},
        {"loss/eval": 0.4, "logps_eval/chosen": float("nan"), "kl/eval": 0.1},   # no desirable rows: NaN, skipped
        {"loss/eval": 0.3, "logps_eval/chosen": -10.25, "logps_eval/rejected": -20.0, "kl/eval": 0.1,
         "generate_eval/accuracy": 0.375}])
    fake_run(sweep, "2_sum", {"name": "sum", "terms": ["dpo", "sft"], "weights": [1.0, 0.5]}, [
        {"loss/eval": 2.0, "logps_eval/chosen": -12.5, **PAIRED}])     # one eval, no generations
    fake_run(sweep, "3_ipo", {"name": "ipo", "token_average": False, "ld_alpha": 0.5,
                              "f_divergence_type": "js_divergence", "use_weighting": True}, [
        {"loss/eval": 25.0, **PAIRED}, {"loss/eval": 20.0, **PAIRED}])   # no log-probs logged
    return sweep


def test_chosen_drift_and_greedy_acc_are_exact(loss_sweep, capsys):
    assert compare.main([str(loss_sweep), "--json", "--no-plot"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert rows["0_dpo"]["chosen_drift"] == -14.75 - -12.5 == -2.25     # last eval minus first, not the middle
    assert rows["0_dpo"]["greedy_acc"] == 0.625
    assert rows["0_dpo"]["reward_acc"] == 0.875 and rows["0_dpo"]["reward_margin"] == 1.25
    assert rows["1_kto"]["chosen_drift"] == 2.25 and rows["1_kto"]["greedy_acc"] == 0.375
    assert rows["1_kto"]["reward_acc"] is None and rows["1_kto"]["reward_margin"] is None
    assert rows["2_sum"]["chosen_drift"] is None and rows["2_sum"]["greedy_acc"] is None   # one eval; none logged
    assert rows["3_ipo"]["chosen_drift"] is None and rows["3_ipo"]["greedy_acc"] is None
    assert [r["loss"] for r in rows.values()] == ["dpo", "kto", "sum[dpo,0.5*sft]",
                                                  "ipo(summed,ld_alpha=0.5,f=js_divergence,wpo)"]

    assert compare.main([str(loss_sweep), "--no-plot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split()
    assert header.index("chosen_drift") == header.index("reward_margin") + 1
    assert header.index("greedy_acc") == header.index("chosen_drift") + 1
    cells = {line.split()[0]: dict(zip(header, line.split())) for line in lines[2:]}
    assert [cells[r]["chosen_drift"] for r in rows] == ["-2.250", "+2.250", "n/a", "n/a"]
    assert [cells[r]["greedy_acc"] for r in rows] == ["0.625", "0.375", "n/a", "n/a"]
    assert [cells[r]["reward_acc"] for r in rows] == ["0.875", "n/a", "0.750", "0.750"]
    assert [cells[r]["loss"] for r in rows] == [rows[r]["loss"] for r in rows]

    assert compare.main([str(loss_sweep), "--markdown", "--no-plot"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    kto = dict(zip(head, (c.strip() for c in md[3].strip("|").split("|"))))
    assert kto["run"] == "1_kto" and kto["reward_acc"] == kto["reward_margin"] == "n/a"
    assert kto["chosen_drift"] == "+2.250" and kto["greedy_acc"] == "0.375"


@pytest.mark.parametrize("loss,label", [
    ({"name": "dpo", "ld_alpha": None, "f_divergence_type": "reverse_kl", "use_weighting": False}, "dpo"),
    ({"name": "ipo", "token_average": True}, "ipo"),
    ({"name": "ipo", "token_average": False}, "ipo(summed)"),
    ({"name": "sum", "terms": ["dpo", "sft"], "weights": [1.0, 1.0]}, "sum[dpo,sft]"),
    ({"name": "sum", "terms": ["dpo", "bco_pair"], "weights": []}, "sum[dpo,bco_pair]"),
    ({"name": "rpo", "terms": ["dpo", "sft"], "weights": [1.0, 1.0]}, "rpo"),        # a named sum keeps its name
    ({"name": "dpo", "sync_ref_model": True, "reference_free": True}, "dpo(sync_ref,ref_free)"),
    ({}, None),
])
def test_loss_label(loss, label):
    assert compare.loss_label(loss) == label


def test_loss_panels_png(loss_sweep, tmp_path):
    png = tmp_path / "losses.png"
    r = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(loss_sweep), "--plot", str(png),
                        "--panels", "margin,chosen_logps,greedy_acc,reward_acc"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[1] > 1200                                  # four panels: wider than the default three


def test_unknown_panel_is_one_line(loss_sweep):
    r = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(loss_sweep), "--panels", "margin,greedy"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "unknown panel greedy" in r.stderr and "greedy_acc" in r.stderr
    assert not list(loss_sweep.rglob("*.png"))
