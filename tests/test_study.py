"""study.py: the lr choice, the seed statistics, equal tokens and the health
notes on hand-made run dirs whose numbers are known (every expected value is
computed here by hand, not by study.py), which jobs a restart runs, and one
tiny real study run twice (the second run launches nothing)."""
import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from conftest import MICRO_MODEL, ROOT

import study
from study import FAILED, FINISHED, PARTIAL, RESUMABLE, StudyError

# Student-t quantiles t_{p, df}: closed forms for df = 1 and 2, else 20 digits from
# mpmath (40-digit root of the regularized incomplete beta), as a printed table would give.
T_TABLE = {
    (0.975, 1): math.tan(math.pi * 0.475),                  # Cauchy: 12.706204736174...
    (0.975, 2): 0.95 / math.sqrt(2 * 0.975 * 0.025),        # (2p-1)/sqrt(2p(1-p)) = 4.302652729749464
    (0.975, 9): 2.2621571627982050,
    (0.95, 4): 2.1318467863266495,
    (0.995, 30): 2.7499956535672250,
    (0.9, 3): 1.6377443536962103,
}
T_975_1, T_975_2 = 12.706204736174707, 4.302652729749464


# ------------------------------------------------------------------ the t quantile

@pytest.mark.parametrize("p,df", list(T_TABLE))
def test_t_quantile_against_known_values(p, df):
    assert study.t_quantile(p, df) == pytest.approx(T_TABLE[(p, df)], rel=1e-13)


def test_t_quantile_brief_values_and_shape():
    # The values quoted in the issue (scipy's): 4.302652729911275 is 1.6e-10 off the closed form above.
    assert study.t_quantile(0.975, 2) == pytest.approx(4.302652729911275, abs=1e-9)
    assert study.t_quantile(0.975, 9) == pytest.approx(2.2621571627982053, abs=1e-13)
    assert study.t_quantile(0.5, 5) == 0.0
    assert study.t_cdf(-2.0, 3) == pytest.approx(1 - study.t_cdf(2.0, 3), abs=1e-15)
    assert study.t_quantile(0.975, 1000) == pytest.approx(1.959963984540054, abs=3e-3)   # -> the normal's


# ------------------------------------------------------------------ aggregation

def test_aggregate_is_exact():
    a = study.aggregate([0.5, 0.25, 0.75], 0.95)            # deviations 0, -0.25, 0.25: s^2 = 0.125 / 2
    assert a["n"] == 3 and a["mean"] == 0.5 and a["std"] == 0.25
    half = T_975_2 * 0.25 / math.sqrt(3)
    assert a["half_width"] == pytest.approx(half, rel=1e-13)
    assert (a["low"], a["high"]) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-13)

    b = study.aggregate([1.0, None, 2.0, float("nan")], 0.95)   # None and NaN are left out
    assert b["n"] == 2 and b["mean"] == 1.5 and b["std"] == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert b["half_width"] == pytest.approx(T_975_1 * math.sqrt(0.5) / math.sqrt(2), rel=1e-13)

    c = study.aggregate([3.0], 0.95)                            # one seed: a mean, no interval
    assert c == {"n": 1, "mean": 3.0, "std": None, "half_width": None, "low": None, "high": None}
    assert study.aggregate([], 0.9)["mean"] is None


# ------------------------------------------------------------------ fake run dirs

def fake_run(path, losses, *, steps=None, tokens_per_step=100, chosen=None, margins=None, accs=None,
             state_bytes=800, latest=True, failed=None, max_steps=None):
    """A run dir as train.py writes it: config.yaml, eval rows at `steps` with
    the given values, a log row at each step after 0, checkpoints/LATEST."""
    steps = steps or [10 * i for i in range(len(losses))]
    path.mkdir(parents=True)
    cfg = {"lr": 1e-3, "precision": "fp32", "max_steps": max_steps if max_steps is not None else steps[-1],
           "loss": {"name": "dpo"}, "optimizer": {"name": "AdamW"}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = []
    for i, (step, loss) in enumerate(zip(steps, losses)):
        if step:
            rows.append({"step": step, "tokens": step * tokens_per_step, "tokens_per_s": 1000.0 + i,
                         "memory/params_bytes": 400, "memory/optimizer_state_bytes": state_bytes,
                         "memory/peak_bytes": 2 ** 20, "update/sparsity": 0.5, "update/sparsity_exact": 0.25})
        rows.append({"step": step, "loss/eval": loss,
                     "logps_eval/chosen": chosen[i] if chosen else -10.0,
                     "rewards_eval/margins": margins[i] if margins else 0.1 * i,
                     "rewards_eval/accuracies": accs[i] if accs else 0.5, "generate_eval/accuracy": 0.25})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if latest:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "LATEST").write_text(f"step-{steps[-1]}\n")
    if failed:
        (path / study.FAILED_MARK).write_text(failed + "\n")
    return path


def make_study(tmp_path, optimizers, seeds=(0, 1, 2), **extra):
    raw = {"name": "t", "out": str(tmp_path / "out"), "train": ["loss=dpo", "wandb.mode=disabled"],
           "seeds": list(seeds), "optimizers": optimizers, **extra}
    return study.check_study(raw)


def label(s, name):
    return next(x for x in s["labels"] if x["label"] == name)


@pytest.fixture
def fake_study(tmp_path):
    """A: lr 0.01 best (0.25) of 0.001/0.01/0.1, seeds 1 and 2 at it (0.5, 0.75);
    B: the smallest lr best (grid edge); C: the lowest loss belongs to a failed run."""
    s = make_study(tmp_path, {"A": {"lr": [1e-3, 1e-2, 1e-1]}, "B": {"lr": [1e-3, 1e-2]},
                              "C": {"optimizer": "SGD", "lr": [1e-3, 1e-2, 1e-1]}})
    A, B, C = (label(s, n) for n in "ABC")
    for lr, loss in [(1e-3, 0.6), (1e-2, 0.25), (1e-1, 0.8)]:
        fake_run(study.run_dir(s, A, lr, 0), [0.7, 0.65, loss])
    displaced = {"chosen": [-10.0, -11.0, -12.0], "margins": [0.0, 1.0, 2.0]}
    fake_run(study.run_dir(s, A, 1e-2, 1), [0.7, 0.6, 0.5], tokens_per_step=80, **displaced)
    fake_run(study.run_dir(s, A, 1e-2, 2), [0.7, 0.6, 0.75], **displaced)
    for lr, loss in [(1e-3, 0.1), (1e-2, 0.4)]:
        fake_run(study.run_dir(s, B, lr, 0), [0.7, 0.5, loss])
    fake_run(study.run_dir(s, B, 1e-3, 1), [0.7, 0.5, 0.2])
    fake_run(study.run_dir(s, C, 1e-3, 0), [0.7, 0.5, 0.3])
    fake_run(study.run_dir(s, C, 1e-2, 0), [0.7, 0.5, 0.2])
    fake_run(study.run_dir(s, C, 1e-1, 0), [0.7, 0.001, 0.001], failed="training diverged at step 11; lower lr")
    return s


def test_lr_choice_is_the_argmin_and_never_a_failed_run(fake_study):
    result = study.collect(fake_study)
    a, b, c = result["labels"]
    assert (a["lr"], b["lr"], c["lr"]) == (1e-2, 1e-3, 1e-2)
    assert not any("grid" in n for n in a["notes"])                                   # 0.01 is inside its grid
    assert "lr 0.001 is the smallest of the grid: grid too narrow, try lower" in b["notes"]
    assert not any("grid too narrow" in n for n in c["notes"])   # 0.01 is the largest that ran, not of the grid
    assert "lr search: 0.1 failed" in c["notes"]
    failed = [r for r in result["runs"] if r["status"] == FAILED]
    assert len(failed) == 1 and failed[0]["notes"] == ["failed: training diverged at step 11"]
    assert failed[0]["error"] == "training diverged at step 11; lower lr"
    # B's seed 2 and C's seeds 1, 2 never ran: missing, not counted
    assert b["seeds"] == [0, 1] and "2/3 seeds finished" in b["notes"] and c["seeds"] == [0]


def test_choose_lr_and_edges():
    assert study.choose_lr([(1e-3, 0.5), (1e-2, None), (1e-1, float("nan")), (1.0, 0.4)], "min") == 1.0
    assert study.choose_lr([(1e-3, 0.5), (1e-2, 0.5)], "min") == 1e-3                 # a tie: the smaller lr
    assert study.choose_lr([(1e-3, 0.5), (1e-2, 0.9)], "max") == 1e-2
    assert study.choose_lr([(1e-3, None)], "min") is None
    assert study.edge_note(0.3, [0.1, 0.3]) == "lr 0.3 is the largest of the grid: grid too narrow, try higher"
    assert study.edge_note(0.1, [0.1]) is None and study.edge_note(0.2, [0.1, 0.2, 0.3]) is None


def test_seed_statistics_on_fake_runs(fake_study):
    result = study.collect(fake_study)
    a = result["labels"][0]
    assert a["seeds"] == [0, 1, 2] and a["state_bytes"] == 800
    loss = a["stats"]["eval_loss"]                                  # final eval losses 0.25, 0.5, 0.75
    assert loss["n"] == 3 and loss["mean"] == 0.5 and loss["std"] == 0.25
    assert loss["half_width"] == pytest.approx(T_975_2 * 0.25 / math.sqrt(3), rel=1e-13)
    assert a["stats"]["chosen_drift"]["mean"] == pytest.approx((0.0 - 2.0 - 2.0) / 3)   # -10 -> -10, -12, -12
    assert a["stats"]["greedy_acc"]["mean"] == 0.25 and a["stats"]["greedy_acc"]["std"] == 0.0
    assert a["stats"]["sparsity_exact"]["mean"] == 0.25
    assert a["stats"]["tokens_per_s"]["mean"] == 1001.5                # log rows 1001 and 1002
    # equal tokens: seed 1 ran 80 tokens a step, so the budget is its 20 * 80 = 1600 tokens; the others
    # (100 a step) are read at 1600 tokens = step 16 between their evals at steps 10 and 20
    assert result["budget"] == 1600
    at = a["stats"]["eval_loss_at_budget"]
    values = [0.65 + (0.25 - 0.65) * 0.6, 0.5, 0.6 + (0.75 - 0.6) * 0.6]
    assert at["mean"] == pytest.approx(sum(values) / 3, rel=1e-12)
    # health: seeds 1 and 2 lost chosen log-prob while their margin rose
    assert "2/3 seeds: likelihood displacement" in a["notes"]


def test_state_bytes_that_differ_across_seeds_are_flagged(tmp_path):
    s = make_study(tmp_path, {"A": {"lr": [1e-3]}}, seeds=[0, 1])
    fake_run(study.run_dir(s, s["labels"][0], 1e-3, 0), [0.7, 0.5], state_bytes=800)
    fake_run(study.run_dir(s, s["labels"][0], 1e-3, 1), [0.7, 0.5], state_bytes=804)
    a = study.collect(s)["labels"][0]
    assert a["state_bytes"] == 804 and "state bytes differ across seeds: 800, 804" in a["notes"]


def test_a_label_whose_every_lr_failed(tmp_path, capsys):
    s = make_study(tmp_path, {"A": {"lr": [1e-3]}, "Z": {"lr": [1.0, 10.0]}}, seeds=[0, 1])
    fake_run(study.run_dir(s, s["labels"][0], 1e-3, 0), [0.7, 0.5])
    fake_run(study.run_dir(s, s["labels"][0], 1e-3, 1), [0.7, 0.25])
    for lr in (1.0, 10.0):
        fake_run(study.run_dir(s, s["labels"][1], lr, 0), [0.7], failed="non-finite loss")
    result = study.report(s, "python study.py t")
    z = result["labels"][1]
    assert z["lr"] is None and z["seeds"] == [] and z["stats"]["eval_loss"]["mean"] is None
    assert z["notes"] == ["lr search: 1, 10 failed", "no lr chosen: every lr failed"]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Z "))
    assert row.split()[1:4] == ["n/a", "0", "n/a"]
    assert (s["out"] / "pareto.png").stat().st_size > 10_000                  # A alone is still plotted


# ------------------------------------------------------------------ equal tokens

def test_loss_at_tokens_by_hand():
    # evals at steps 0, 15, 20; log rows at 10 (1000 tokens) and 20 (3000): the eval at 15 gets 2000
    curves = {"eval_loss_step": [0, 15, 20], "eval_loss": [0.7, 0.4, 0.2], "tokens_step": [10, 20],
              "tokens": [1000, 3000]}
    assert study.loss_at_tokens(curves, 2500) == pytest.approx(0.3, abs=1e-15)
    assert study.loss_at_tokens(curves, 500) == pytest.approx(0.7 - 0.3 * 500 / 2000, abs=1e-15)
    assert study.loss_at_tokens(curves, 3000) == 0.2 and study.loss_at_tokens(curves, 0) == 0.7
    assert study.loss_at_tokens(curves, 3001) is None and study.loss_at_tokens(curves, None) is None
    assert study.loss_at_tokens({**curves, "tokens_step": [], "tokens": []}, 500) is None   # no tokens logged


# ------------------------------------------------------------------ health notes

def curves(margin, acc=1.0, chosen=(-10.0, -9.0), steps=None):
    steps = steps or [10 * i for i in range(len(margin))]
    return {"margin_step": steps, "margin": list(margin), "reward_acc": [0.5] * (len(margin) - 1) + [acc],
            "chosen": list(chosen)}


def test_likelihood_displacement():
    assert study.likelihood_displacement(curves([0.0, 2.0], chosen=[-10.0, -12.0, -15.0]))
    assert not study.likelihood_displacement(curves([0.0, 2.0], chosen=[-10.0, -9.0]))     # chosen rose
    assert not study.likelihood_displacement(curves([0.0, 2.0], chosen=[-10.0, -10.5]))    # fell by 5%: not more
    assert study.likelihood_displacement(curves([0.0, 2.0], chosen=[-10.0, -10.6]))        # fell by 6%
    assert not study.likelihood_displacement(curves([2.0, 1.0], chosen=[-10.0, -12.0]))    # margin fell
    assert not study.likelihood_displacement(curves([0.0, 2.0], chosen=[-10.0]))


@pytest.mark.parametrize("margin,acc,steps,expected", [
    ([0, 8, 12, 12.5], 1.0, None, True),          # first 0.8 a step, last 0.05 (6%)
    ([0, 8, 12, 12.9], 1.0, None, False),         # last 0.09 a step: 11%
    ([0, 8, 12, 12.5], 0.9, None, False),         # accuracy below 0.95
    ([0, 8, 8.5], 0.95, None, True),              # exactly 0.95 counts; 3 evals are enough
    ([0, 8], 1.0, None, False),                   # one interval: nothing to compare
    ([0, 10, 15, 15.2], 1.0, [0, 10, 20, 25], True),   # a short last interval: per step, 0.04 vs 1.0
    ([0, 10, 15, 17.5], 1.0, [0, 10, 20, 25], False),  # 2.5 in 5 steps = 0.5 a step
    ([0, -1, 5, 5.01], 1.0, None, False),         # the margin fell first: no initial gain to compare with
])
def test_margins_saturating(margin, acc, steps, expected):
    assert study.margins_saturating(curves(margin, acc, steps=steps)) is expected


# ------------------------------------------------------------------ which jobs a restart runs

def test_plan_jobs_on_a_mix_of_run_dirs(tmp_path):
    finished = fake_run(tmp_path / "finished", [0.7, 0.6, 0.5])
    resumable = fake_run(tmp_path / "resumable", [0.7, 0.6], max_steps=20)            # stopped with a checkpoint
    partial = fake_run(tmp_path / "partial", [0.7, 0.6], max_steps=20, latest=False)   # killed before one
    no_latest = fake_run(tmp_path / "no_latest", [0.7, 0.6, 0.5], latest=False)        # died while saving the end
    failed = fake_run(tmp_path / "failed", [0.7], failed="training diverged")
    empty = tmp_path / "empty"
    empty.mkdir()                                                                       # Hydra made it, then a kill
    absent = tmp_path / "absent"
    plan = study.plan_jobs([finished, resumable, partial, no_latest, failed, empty, absent])
    assert plan == {FINISHED: [finished], FAILED: [failed], RESUMABLE: [resumable],
                    PARTIAL: [partial, no_latest, empty], "absent": [absent]}


def test_a_phase_resumes_reruns_and_skips(tmp_path, capsys):
    s = make_study(tmp_path, {"A": {"lr": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}}, seeds=[0])
    a = s["labels"][0]
    dirs = {lr: study.run_dir(s, a, lr, 0) for lr in a["grid"]}
    fake_run(dirs[1e-3], [0.7, 0.6, 0.5])
    fake_run(dirs[1e-2], [0.7, 0.6], max_steps=20)
    fake_run(dirs[1e-1], [0.7, 0.6], max_steps=20, latest=False)
    fake_run(dirs[1.0], [0.7], failed="diverged")
    study.Launcher(s, dry_run=True).phase("lr search A", ["x=1"], "lr", [(repr(lr), d) for lr, d in dirs.items()],
                                          "A")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("study t: lr search A: 3 of 5 runs to do (1 resumed from their checkpoints; 1 unfinished "
                      "without a checkpoint: deleted and rerun; 1 failed earlier and not rerun: delete the run dir "
                      "to retry)")
    assert out[1] == f"  would delete the partial run {dirs[1e-1]}"
    assert out[2] == "  would launch: python train.py -m x=1 resume=true lr=0.01"
    assert out[3] == "  would launch: python train.py -m x=1 lr=0.1,10.0"
    assert dirs[1e-1].exists()                                                          # a dry run deletes nothing


def test_dry_run_writes_nothing(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "d", "out": str(tmp_path / "out"), "train": ["loss=dpo"],
                                    "start": {"overrides": ["loss=sft"]}, "seeds": [0, 1],
                                    "optimizers": {"SGD(momentum=0.9)": {"optimizer": "SGD", "lr": [0.1, 1.0],
                                                                         "overrides": ["optimizer.momentum=0.9"]}}}))
    assert study.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    sweep = tmp_path / "out" / "runs" / "SGD_momentum_0.9"
    assert (f"python train.py -m loss=dpo model.archive={tmp_path / 'out' / 'start'} wandb.group=d optimizer=SGD "
            f"optimizer.momentum=0.9 hydra.sweep.dir={sweep} 'hydra.sweep.subdir=lr_${{lr}}_seed_${{seed}}' seed=0 "
            "lr=0.1,1.0") in out
    assert "seeds SGD(momentum=0.9): 1 runs at the lr the search picks, once it has one (the lr search has not finished)" in out


# ------------------------------------------------------------------ the study file

def test_grid_is_log_spaced_and_rounded():
    assert study.lr_grid({"min": 1e-4, "max": 1e-2, "points": 5}) == [0.0001, 0.000316, 0.001, 0.00316, 0.01]
    assert study.lr_grid([1e-2, 1e-3]) == [1e-3, 1e-2]


@pytest.mark.parametrize("change,message", [
    ({"seeds": []}, "seeds: [] must be a non-empty list of distinct integers"),
    ({"seeds": [0, 0]}, "seeds: [0, 0] must be a non-empty list"),
    ({"confidence": 95}, "confidence: 95 must be a number between 0 and 1"),
    ({"select": {"metric": "loss/eval", "mode": "lowest"}}, "select: "),
    ({"train": ["lr=0.1"]}, "train: lr=0.1: the study sets lr itself"),
    ({"train": ["hydra.sweep.dir=x"]}, "the study sets hydra.sweep.dir itself"),
    ({"optimizers": {"A": {"lr": [-1.0]}}}, "optimizers.A.lr: -1.0 is not a positive number"),
    ({"optimizers": {"A": {"lr": {"min": 1e-2, "max": 1e-3, "points": 3}}}}, "min 0.01 must be below max 0.001"),
    ({"optimizers": {"A": {"lr": [1e-3], "betas": 1}}}, "optimizers.A: unknown key 'betas'"),
    ({"optimizers": {"A(x)": {"lr": [1.0]}, "A_x": {"lr": [1.0]}}}, "its folder name A_x is also A(x)'s"),
    ({"seed": [0]}, "unknown key 'seed'"),
])
def test_bad_study_files_are_one_line(tmp_path, change, message):
    raw = {"name": "t", "out": "o", "train": [], "seeds": [0], "optimizers": {"A": {"lr": [1.0]}}, **change}
    with pytest.raises(StudyError, match=None) as e:
        study.check_study(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,message", [
    (["no_such_study"], "error: unknown study 'no_such_study': no config/study/no_such_study.yaml"),
    (["{path}"], "missing key 'optimizers'"),
])
def test_command_line_errors(tmp_path, args, message):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nout: o\ntrain: []\nseeds: [0]\n")
    r = subprocess.run([sys.executable, str(ROOT / "study.py"), *(a.format(path=path) for a in args)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_pareto_front():
    points = [("A", 0, 0.5), ("B", 100, 0.3), ("C", 100, 0.4), ("D", 200, 0.3), ("E", 50, 0.6), ("F", 300, 0.1)]
    assert [p[0] for p in study.pareto_front(points)] == ["A", "B", "F"]


def test_wandb_run_of_the_study(fake_study, tmp_path, capsys):
    fake_study["train"] = ["loss=dpo", "wandb.mode=offline", "wandb.project=p"]
    study.report(fake_study, "python study.py t")
    out = capsys.readouterr().out
    (run,) = (fake_study["out"] / "wandb").glob("offline-run-*")
    assert f"wandb: {run}" in out
    (table,) = run.glob("files/media/table/study/summary_*.table.json")
    data = json.loads(table.read_text())
    assert [row[0] for row in data["data"]] == ["A", "B", "C"] and "eval_loss_mean" in data["columns"]
    assert len(list(run.glob("files/media/images/study/*.png"))) == 2


# ------------------------------------------------------------------ a real study, run twice

FAST = ["dataset.n_train=64", "dataset.n_eval=32", "n_eval_examples=16", "n_eval_generations=4", "batch_size=8",
        "eval_batch_size=16", "log_every=1", "eval_every=1", "max_steps=2", "wandb.mode=disabled",
        "reference_cache_dir=null"]


def run_study(path):
    r = subprocess.run([sys.executable, str(ROOT / "study.py"), str(path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    """SGD (lr 0.1, and 1e6: diverges) and AdamW (1e-3, 1e-2), seeds 0 and 1: 6 jobs in 4 processes of
    ~8 s each (a `start` run would be a fifth: the dry-run test checks its model.archive line instead)."""
    tmp = tmp_path_factory.mktemp("study")
    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump({
        "name": "micro", "out": str(tmp / "out"), "seeds": [0, 1],
        "train": ["loss=dpo", "metrics.update_sparsity=true", *MICRO_MODEL, *FAST],
        "optimizers": {"SGD": {"lr": [0.1, 1e6]}, "AdamW": {"lr": [1e-3, 1e-2]}}}, sort_keys=False))
    first = run_study(path)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp / "out").rglob("metrics.jsonl")}
    second = run_study(path)
    return {"out": tmp / "out", "first": first, "second": second, "mtimes": mtimes}


def test_real_study_runs_everything_once(real_study):
    first, second, out = real_study["first"], real_study["second"], real_study["out"]
    assert "study micro: lr search SGD: 2 of 2 runs to do" in first
    assert "study micro: launched 6 train.py jobs in 4 processes; 1 failed" in first
    assert (out / "runs" / "SGD" / "lr_1000000.0_seed_0" / study.FAILED_MARK).read_text().startswith(
        "training diverged")
    # the restart: every phase has nothing to do, nothing is launched, no metrics file is touched
    todo = [line for line in second.splitlines() if "runs to do" in line]
    assert len(todo) == 4 and all(": 0 of " in line for line in todo)
    assert "study micro: launched 0 train.py jobs in 0 processes" in second and "launching" not in second
    assert len(real_study["mtimes"]) == 6
    assert real_study["mtimes"] == {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}


def test_real_study_numbers_equal_the_run_files(real_study):
    out = real_study["out"]
    result = json.loads((out / "study.json").read_text())
    sgd, adamw = result["labels"]
    assert sgd["label"] == "SGD" and sgd["lr"] == 0.1 and sgd["state_bytes"] == 0      # 1e6 failed: never chosen
    assert "lr search: 1e+06 failed" in sgd["notes"] and any("try lower" in n for n in sgd["notes"])
    for x in (sgd, adamw):
        assert x["seeds"] == [0, 1]
        finals = []
        for seed in (0, 1):
            rows = [json.loads(line) for line in (out / "runs" / x["label"] / f"lr_{x['lr']!r}_seed_{seed}" /
                                                  "metrics.jsonl").read_text().splitlines()]
            finals.append([r["loss/eval"] for r in rows if "loss/eval" in r][-1])
            params = [r["memory/params_bytes"] for r in rows if "memory/params_bytes" in r][-1]
        mean, s = (finals[0] + finals[1]) / 2, abs(finals[0] - finals[1]) / math.sqrt(2)
        stats = x["stats"]["eval_loss"]
        assert stats["mean"] == pytest.approx(mean, rel=1e-12) and stats["std"] == pytest.approx(s, rel=1e-9)
        assert stats["half_width"] == pytest.approx(T_975_1 * s / math.sqrt(2), rel=1e-9)
    extra = adamw["state_bytes"] - 2 * params                       # exp_avg + exp_avg_sq, plus 4-byte steps
    assert extra > 0 and extra % 4 == 0 and extra < 400
    assert result["budget"] > 0 and "eval loss @" in (out / "study.md").read_text()


def test_real_study_pareto_png_is_not_trivial(real_study):
    import matplotlib.image
    import numpy as np

    png = real_study["out"] / "pareto.png"
    assert png.stat().st_size > 10_000 and f"wrote: {png}" in real_study["first"]
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50   # markers, bars, text: not blank
    assert (real_study["out"] / "curves.png").stat().st_size > 10_000
