"""A fair optimizer comparison from one config: for each optimizer a small
learning-rate grid, its best lr on the eval split, then several seeds at that
lr; mean and a confidence interval per metric, a Pareto figure and the
learning curves.

    python study.py tiny                   # config/study/tiny.yaml: run what is missing, then report
    python study.py path/to/study.yaml     # any study file
    python study.py tiny --dry-run         # what it would launch; writes nothing
    python study.py tiny --report-only     # rebuild the outputs from the run dirs; runs nothing

The study file is plain YAML (read with OmegaConf, not composed by Hydra):

    name: tiny                     # the wandb group of every run, and the study's name
    out: runs/study_tiny           # everything the study writes goes under here (relative to the current folder)
    start:                         # optional: one run trained first (e.g. SFT), the start of every other run
      overrides: [loss=sft, max_steps=150]
    train: [loss=dpo, max_steps=30, metrics.update_sparsity=true]   # train.py overrides common to every run
    select: {metric: loss/eval, mode: min}   # lr choice: the last logged value of metric, at seeds[0]
    seeds: [0, 1, 2]               # seeds[0] runs the lr grid; the others run at the chosen lr
    confidence: 0.95               # of the Student-t interval
    optimizers:                    # label -> settings; the label is what the tables show
      AdamW: {lr: {min: 1e-4, max: 1e-2, points: 5}}   # log-spaced, both ends, 3 significant digits
      RMSprop: {lr: [1e-4, 3e-4, 1e-3]}                 # or a list
      SGD(momentum=0.9): {optimizer: SGD, overrides: [optimizer.momentum=0.9], lr: [0.01, 0.1, 1.0]}

`optimizer:` defaults to the label. `select`, `confidence` and `start` are
optional. The study sets lr, seed, optimizer, run_dir, resume, wandb.group,
hydra.* (and model.archive when `start` is set): the overrides may not.

What runs (each phase one `python train.py -m ...`, Hydra multirun; no second runner):
  <out>/start/                              the start run, `model.archive=<out>/start` for the others
  <out>/runs/<label>/lr_<lr>_seed_<seed>/   one run dir per (lr, seed), named by its values only, so a
                                            restart finds its runs: a finished one (an eval at its
                                            max_steps and checkpoints/LATEST) is never rerun, one with a
                                            checkpoint is resumed (resume=true), one without is the
                                            study's own partial output: deleted and rerun
A run that fails (train.py exits non-zero, e.g. divergence at a too-high lr)
is marked failed (`STUDY_FAILED` in its run dir holds its error line), is
never chosen and is not rerun (delete its run dir to retry); the study goes on.
Ctrl-C: the running job saves a checkpoint, the study stops; the same command
goes on from there.

Outputs, in <out>: study.md (tables, notes, the command), study.json (per run
and per label), pareto.png (final eval loss against optimizer-state bytes,
marker area = tokens/s), curves.png (eval loss and chosen log-prob by step,
seed mean and min-max band), and with wandb on (the `train` overrides do not
say wandb.mode=disabled) one more wandb run, `study-<name>` in group <name>,
with the same table, a scatter plot and both PNGs. docs/study.md has the
statistics and the thresholds of the health notes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import compare

ROOT = Path(__file__).resolve().parent
STUDY_DIR = ROOT / "config" / "study"
FAILED_MARK = "STUDY_FAILED"       # in a run dir: the error line of the run that failed
SUBDIR = "lr_${lr}_seed_${seed}"   # hydra.sweep.subdir: the swept values only, so a job's dir survives restarts

KEYS = {"name", "out", "start", "train", "select", "seeds", "confidence", "optimizers"}
REQUIRED = ("name", "out", "train", "seeds", "optimizers")
OPTIMIZER_KEYS = {"optimizer", "overrides", "lr"}
SET_BY_STUDY = ("lr", "seed", "optimizer", "run_dir", "resume", "wandb.group", "model.archive")

# Health-note thresholds (docs/study.md says why).
DISPLACED_SHARE = 0.05      # likelihood displacement: the chosen log-prob fell by more than this share of its
                            # first value's magnitude (a few hundredths of a nat is noise, not displacement)
SATURATED_ACCURACY = 0.95   # margins saturating: reward accuracy at the last eval at least this ...
SATURATED_RATE = 0.10       # ... and the margin's gain per step over the last eval interval below this share of
                            # its gain per step over the first

# The per-label metrics: (key in compare.summarize's row or ours, table header, format).
METRICS = [
    ("eval_loss", "eval loss", ".4f"),
    ("eval_loss_at_budget", "eval loss @ {budget} tokens", ".4f"),
    ("reward_acc", "reward acc", ".3f"),
    ("reward_margin", "margin", ".3f"),
    ("chosen_drift", "chosen drift", "+.2f"),
    ("greedy_acc", "greedy acc", ".3f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("sparsity_bf16", "sparsity bf16", ".4f"),
    ("sparsity_exact", "sparsity exact", ".4f"),
]


class StudyError(Exception):
    """One line for the user (exit status `code`), never a traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------
# The study file.

def study_path(arg: str) -> Path:
    """A name in config/study/, else a path to a YAML file."""
    named = STUDY_DIR / f"{arg}.yaml"
    if named.is_file():
        return named
    if Path(arg).is_file():
        return Path(arg)
    names = sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))
    raise StudyError(f"unknown study {arg!r}: no {named.relative_to(ROOT)} and no file {arg}; "
                     f"studies: {', '.join(names) or 'none'}")


def load_study(arg: str) -> dict:
    from omegaconf import OmegaConf

    path = study_path(arg)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # YAML syntax, a bad interpolation
        raise StudyError(f"{path}: not a valid study file ({str(e).splitlines()[0]})") from None
    try:
        return check_study(raw)
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None


def check_study(raw) -> dict:
    """The study file, checked and normalised (absolute `out`, each label's
    lr grid and folder name); every problem is one line."""
    if not isinstance(raw, dict):
        raise StudyError("not a mapping of study keys")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise StudyError(f"unknown key {unknown[0]!r}; keys: {', '.join(sorted(KEYS))}")
    for key in REQUIRED:
        if raw.get(key) is None:
            raise StudyError(f"missing key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise StudyError(f"name: {name!r} must be letters, digits, '_', '.' or '-'")
    if not isinstance(raw["out"], str) or not raw["out"]:
        raise StudyError("out: must be a folder path")
    start = raw.get("start")
    if start is not None and (not isinstance(start, dict) or set(start) != {"overrides"}):
        raise StudyError("start: must be {overrides: [...]}")
    select = {"metric": "loss/eval", "mode": "min", **(raw.get("select") or {})}
    if set(select) != {"metric", "mode"} or select["mode"] not in ("min", "max") or not isinstance(
            select["metric"], str):
        raise StudyError(f"select: {raw.get('select')} must be {{metric: <metrics.jsonl key>, mode: min|max}}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) < len(
            seeds):
        raise StudyError(f"seeds: {seeds} must be a non-empty list of distinct integers")
    confidence = raw.get("confidence", 0.95)
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise StudyError(f"confidence: {confidence} must be a number between 0 and 1, e.g. 0.95")
    # model.archive is the study's only when it trains the start; without one, `train` may name a checkpoint
    train_reserved = SET_BY_STUDY if start else tuple(k for k in SET_BY_STUDY if k != "model.archive")
    return {
        "name": name, "out": Path(raw["out"]).absolute(), "select": select, "seeds": seeds,
        "confidence": confidence, "train": check_overrides(raw["train"], "train", train_reserved),
        "start": check_overrides(start["overrides"], "start.overrides", ("run_dir", "resume", "wandb.group"))
        if start else None,
        "labels": check_labels(raw["optimizers"]),
    }


def check_overrides(overrides, where: str, reserved: tuple[str, ...]) -> list[str]:
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise StudyError(f"{where}: {overrides} must be a list of train.py overrides (key=value)")
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in reserved or key.startswith("hydra."):
            raise StudyError(f"{where}: {o}: the study sets {key} itself")
    return list(overrides)


def check_labels(optimizers) -> list[dict]:
    if not isinstance(optimizers, dict) or not optimizers:
        raise StudyError("optimizers: must map labels to settings, e.g. AdamW: {lr: [1e-4, 1e-3]}")
    labels, slugs = [], {}
    for label, settings in optimizers.items():
        where = f"optimizers.{label}"
        if not isinstance(settings, dict) or "lr" not in settings:
            raise StudyError(f"{where}: must be a mapping with an lr grid")
        unknown = sorted(set(settings) - OPTIMIZER_KEYS)
        if unknown:
            raise StudyError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(OPTIMIZER_KEYS))}")
        slug = re.sub(r"[^\w.-]+", "_", str(label)).strip("_") or "optimizer"
        if slug in slugs:
            raise StudyError(f"{where}: its folder name {slug} is also {slugs[slug]}'s; rename one")
        slugs[slug] = label
        labels.append({
            "label": str(label), "slug": slug, "optimizer": str(settings.get("optimizer") or label),
            "overrides": check_overrides(settings.get("overrides") or [], f"{where}.overrides", SET_BY_STUDY),
            "grid": lr_grid(settings["lr"], f"{where}.lr"),
        })
    return labels


def lr_grid(spec, where: str = "lr") -> list[float]:
    """A list of lrs as given, or {min, max, points}: `points` log-spaced values
    from min to max, both included, rounded to 3 significant digits. Sorted."""
    if isinstance(spec, dict):
        if set(spec) != {"min", "max", "points"} or type(spec["points"]) is not int or spec["points"] < 2:
            raise StudyError(f"{where}: {spec} must be {{min: <lr>, max: <lr>, points: <2 or more>}} or a list")
        low, high, n = _positive(spec["min"], where), _positive(spec["max"], where), spec["points"]
        if low >= high:
            raise StudyError(f"{where}: min {low:g} must be below max {high:g}")
        values = [float(f"{low * (high / low) ** (i / (n - 1)):.3g}") for i in range(n)]
    elif isinstance(spec, list) and spec:
        values = [_positive(v, where) for v in spec]
    else:
        raise StudyError(f"{where}: {spec} must be a list of lrs or {{min, max, points}}")
    if len(set(values)) < len(values):
        raise StudyError(f"{where}: {values} repeats an lr")
    return sorted(values)


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise StudyError(f"{where}: {value!r} is not a positive number")
    return float(value)


def run_dir(study: dict, label: dict, lr: float, seed: int) -> Path:
    """Where Hydra puts the job: hydra.sweep.dir / SUBDIR, with `${lr}` written
    as OmegaConf writes a float (Python's repr: 0.001, 1e-05)."""
    return study["out"] / "runs" / label["slug"] / f"lr_{lr!r}_seed_{seed}"


# ----------------------------------------------------------------------------
# Statistics: the Student-t interval without scipy.

def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on t_cdf."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, not p={p}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    while high - low > 1e-15 * high:
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def aggregate(values: list, confidence: float) -> dict:
    """Mean, sample std and the Student-t interval mean +- t_{(1+c)/2, n-1} s/sqrt(n)
    of the values that are numbers (None and NaN are left out). n = 1: no interval."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    out = {"n": len(xs), "mean": None, "std": None, "half_width": None, "low": None, "high": None}
    if xs:
        out["mean"] = statistics.fmean(xs)
    if len(xs) >= 2:
        out["std"] = statistics.stdev(xs)
        out["half_width"] = t_quantile((1 + confidence) / 2, len(xs) - 1) * out["std"] / math.sqrt(len(xs))
        out["low"], out["high"] = out["mean"] - out["half_width"], out["mean"] + out["half_width"]
    return out


# ----------------------------------------------------------------------------
# Run dirs on disk: which jobs are missing.

FINISHED, FAILED, RESUMABLE, PARTIAL, ABSENT = "finished", "failed", "resumable", "partial", "absent"


def is_finished(run: Path) -> bool:
    """An eval row at the run's max_steps, and checkpoints/LATEST."""
    if not compare.is_run(run) or not (run / "checkpoints" / "LATEST").is_file():
        return False
    try:
        max_steps = compare.read_config(run).get("max_steps")
    except compare.CompareError:
        return False
    return any(r["step"] == max_steps and "loss/eval" in r for r in compare.read_metrics(run))


def run_state(run: Path) -> str:
    if not run.exists():
        return ABSENT
    if (run / FAILED_MARK).is_file():
        return FAILED
    if is_finished(run):
        return FINISHED
    return RESUMABLE if (run / "checkpoints" / "LATEST").is_file() else PARTIAL


def plan_jobs(runs: list[Path]) -> dict[str, list[Path]]:
    """The run dirs by state: finished and failed stay as they are; resumable
    ones resume; partial ones are deleted and, with absent ones, run anew."""
    plan = {state: [] for state in (FINISHED, FAILED, RESUMABLE, PARTIAL, ABSENT)}
    for run in runs:
        plan[run_state(run)].append(run)
    return plan


def failure(run: Path) -> str | None:
    mark = run / FAILED_MARK
    return mark.read_text().strip() if mark.is_file() else None


# ----------------------------------------------------------------------------
# Launching train.py.

def hydra_value(path: Path) -> str:
    """A path as a Hydra override value: relative to the repo root (train.py's
    working folder) when inside it; quoted when Hydra's grammar needs it."""
    text = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return text if re.fullmatch(r"[\w./+-]+", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shown(cmd: list[str]) -> str:
    return shlex.join(["python", *cmd[1:]])


class Launcher:
    """Runs train.py for one study (or, with dry_run, only prints what it
    would run); each process's output goes to <out>/logs/, and it counts what
    it launched."""

    def __init__(self, study: dict, dry_run: bool):
        self.study, self.dry_run = study, dry_run
        self.processes = self.jobs = self.failed = 0

    def say(self, text: str) -> None:
        print(f"study {self.study['name']}: {text}", flush=True)

    def launch(self, args: list[str], log_name: str, runs: list[Path]) -> tuple[int, str | None]:
        """One train.py process for these run dirs; returns its exit status and
        its last `error:` line."""
        cmd = [sys.executable, "train.py", *args]
        log = self.study["out"] / "logs" / f"{log_name}.log"
        print(f"  launching: {shown(cmd)}\n    (log: {_shown_path(log)})", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"$ {shown(cmd)}\n")
            f.flush()
            offset = f.tell()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                stop_after_checkpoint(proc, runs)
                raise StudyError("interrupted (Ctrl-C); run the same command to go on (the interrupted run resumes "
                                 "from its checkpoint)", 130) from None
        self.processes += 1
        with open(log) as f:
            f.seek(offset)
            errors = [line.strip().removeprefix("error: ") for line in f if line.startswith("error:")]
        print(f"    exit status {rc} after {time.perf_counter() - started:.1f} s", flush=True)
        return rc, errors[-1] if errors else (None if rc == 0 else f"train.py exited with status {rc}")

    def multirun(self, base: list[str], key: str, jobs: list[tuple[str, Path]], log_name: str) -> None:
        """One `train.py -m` over key=values, in order. Hydra stops at a failing
        job: mark it failed (the first unfinished one) and go on with the rest
        in a new multirun. A failure before the job's run dir exists is a
        broken command, not a bad lr: the study stops."""
        while jobs:
            rc, error = self.launch(["-m", *base, f"{key}={','.join(v for v, _ in jobs)}"], log_name,
                                    [d for _, d in jobs])
            unfinished = [(v, d) for v, d in jobs if run_state(d) != FINISHED]
            self.jobs += len(jobs) - len(unfinished) + (rc != 0 and bool(unfinished))   # the failed one ran too
            if rc == 0 or not unfinished:
                return
            (_, bad), jobs = unfinished[0], unfinished[1:]
            if not bad.exists():
                raise StudyError(f"train.py failed before {_shown_path(bad)} started: {error}")
            (bad / FAILED_MARK).write_text(error + "\n")
            self.failed += 1
            print(f"    failed: {_shown_path(bad)}: {error}", flush=True)

    def phase(self, title: str, base: list[str], key: str, jobs: list[tuple[str, Path]], log_name: str) -> None:
        """Run the jobs of one phase that are not finished (or failed)."""
        plan = plan_jobs([d for _, d in jobs])
        todo = len(plan[RESUMABLE]) + len(plan[PARTIAL]) + len(plan[ABSENT])
        extras = [f"{len(plan[RESUMABLE])} resumed from their checkpoints"] if plan[RESUMABLE] else []
        extras += [f"{len(plan[PARTIAL])} unfinished without a checkpoint: deleted and rerun"] if plan[PARTIAL] else []
        extras += [f"{len(plan[FAILED])} failed earlier and not rerun: delete the run dir to retry"] if plan[
            FAILED] else []
        self.say(f"{title}: {todo} of {len(jobs)} runs to do" + (f" ({'; '.join(extras)})" if extras else ""))
        for partial in plan[PARTIAL]:
            if not self.dry_run:
                assert partial.is_relative_to(self.study["out"])   # only ever the study's own folders
                shutil.rmtree(partial)
            print(f"  {'would delete' if self.dry_run else 'deleted'} the partial run {_shown_path(partial)}")
        for extra, states in ((["resume=true"], (RESUMABLE,)), ([], (PARTIAL, ABSENT))):
            batch = [(v, d) for v, d in jobs if any(d in plan[state] for state in states)]
            if batch and self.dry_run:
                values = ",".join(v for v, _ in batch)
                print(f"  would launch: {shown([sys.executable, 'train.py', '-m', *base, *extra, f'{key}={values}'])}")
            elif batch:
                self.multirun(base + extra, key, batch, log_name)

    def start(self) -> None:
        """The start run (not a multirun): everything else begins from it."""
        study, run = self.study, self.study["out"] / "start"
        state = run_state(run)
        self.say(f"start: {0 if state == FINISHED else 1} of 1 runs to do"
                 + (" (resumed from its checkpoint)" if state == RESUMABLE else ""))
        if state == FINISHED:
            return
        args = [*study["start"], f"run_dir={hydra_value(run)}", f"wandb.group={study['name']}"]
        args += ["resume=true"] if state == RESUMABLE else []
        if state == PARTIAL:
            if not self.dry_run:
                shutil.rmtree(run)
            print(f"  {'would delete' if self.dry_run else 'deleted'} the partial run {_shown_path(run)}")
        if self.dry_run:
            print(f"  would launch: {shown([sys.executable, 'train.py', *args])}")
            return
        rc, error = self.launch(args, "start", [run])
        self.jobs += 1
        if rc != 0 or not is_finished(run):
            raise StudyError(f"the start run {_shown_path(run)} failed: {error}; fix it, then run the study again")


def stop_after_checkpoint(proc: subprocess.Popen, runs: list[Path]) -> None:
    """Ctrl-C reached train.py too: its current job finishes the step and saves
    a checkpoint, but a multirun would then start its next job. Wait for that
    checkpoint (or the process's end), then end the process; a second Ctrl-C
    ends it at once. A job killed in its setup is a partial run: rerun later."""
    def latest(run):   # checkpoints/LATEST is replaced atomically by every checkpoint
        path = run / "checkpoints" / "LATEST"
        return path.stat().st_mtime_ns if path.is_file() else None

    print("\n  Ctrl-C: waiting for train.py to save a checkpoint (Ctrl-C again: stop now)", flush=True)
    before = {run: latest(run) for run in runs}
    try:
        while proc.poll() is None and all(latest(run) == mtime for run, mtime in before.items()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    proc.kill()
    proc.wait()


def common_overrides(study: dict, label: dict) -> list[str]:
    archive = [f"model.archive={hydra_value(study['out'] / 'start')}"] if study["start"] else []
    return [*study["train"], *archive, f"wandb.group={study['name']}", f"optimizer={label['optimizer']}",
            *label["overrides"], f"hydra.sweep.dir={hydra_value(study['out'] / 'runs' / label['slug'])}",
            f"hydra.sweep.subdir={SUBDIR}"]


def run_study(study: dict, dry_run: bool) -> Launcher:
    """Start, then per label the lr search at seeds[0], then seeds[1:] at the chosen lr."""
    launcher = Launcher(study, dry_run)
    if not dry_run:
        check_unchanged(study)
    if study["start"]:
        launcher.start()
    seed0 = study["seeds"][0]
    for label in study["labels"]:
        jobs = [(repr(lr), run_dir(study, label, lr, seed0)) for lr in label["grid"]]
        launcher.phase(f"lr search {label['label']}", [*common_overrides(study, label), f"seed={seed0}"], "lr",
                       jobs, f"{label['slug']}_lr_search")
    for label in study["labels"]:
        others = study["seeds"][1:]
        if not others:
            continue
        search = search_records(study, label)
        lr = chosen_lr(study, search)
        if lr is None:
            launcher.say(f"seeds {label['label']}: {len(others)} runs at the lr the search picks, once it has one "
                         f"({no_lr_reason(study, search)})")
            continue
        launcher.say(f"lr search {label['label']}: chose lr {lr!r} ({study['select']['metric']} "
                     f"{'lowest' if study['select']['mode'] == 'min' else 'highest'} of {label['grid']})")
        jobs = [(str(seed), run_dir(study, label, lr, seed)) for seed in others]
        launcher.phase(f"seeds {label['label']} at lr {lr!r}", [*common_overrides(study, label), f"lr={lr!r}"],
                       "seed", jobs, f"{label['slug']}_seeds")
    if dry_run:
        launcher.say("dry run: nothing was launched, deleted or written")
    else:
        failed = f"; {launcher.failed} failed" if launcher.failed else ""
        launcher.say(f"launched {launcher.jobs} train.py jobs in {launcher.processes} processes{failed}")
    return launcher


def check_unchanged(study: dict) -> None:
    """A finished run is reused on restart, so the settings it ran with must
    still be the study's: `train`, `start` and each label's optimizer and
    overrides (wandb.* aside: they change no result) are recorded in
    <out>/study_settings.json on the first run and a later change is refused.
    Grids, seeds and labels may grow."""
    def kept(overrides):
        return None if overrides is None else [o for o in overrides if not o.startswith("wandb.")]

    path = study["out"] / "study_settings.json"
    now = {"train": kept(study["train"]), "start": kept(study["start"]),
           "labels": {x["label"]: [f"optimizer={x['optimizer']}", *kept(x["overrides"])] for x in study["labels"]}}
    before = json.loads(path.read_text()) if path.is_file() else {**now, "labels": {}}
    changed = [(key, before[key], now[key]) for key in ("train", "start") if before[key] != now[key]]
    changed += [(f"optimizers.{label}", before["labels"][label], settings) for label, settings in now["labels"].items()
                if before["labels"].get(label, settings) != settings]
    if changed:
        where, old, new = changed[0][0], changed[0][1] or [], changed[0][2] or []
        diff = " ".join([f"-{o}" for o in old if o not in new] + [f"+{o}" for o in new if o not in old]) or "order"
        raise StudyError(f"{where} changed since {_shown_path(study['out'])} was started ({diff}): its finished runs "
                         "would be reused; use a new `out` (or delete that folder)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**now, "labels": {**before["labels"], **now["labels"]}}, indent=1) + "\n")


# ----------------------------------------------------------------------------
# Reading the results: lr choice, equal tokens, health notes.

def choose_lr(candidates: list[tuple[float, float | None]], mode: str) -> float | None:
    """The lr with the lowest (mode=min) or highest (max) value; a run without
    a finite value (failed, or never logged it) is never chosen; ties go to
    the first (the smaller lr)."""
    usable = [(lr, v) for lr, v in candidates if isinstance(v, (int, float)) and math.isfinite(v)]
    if not usable:
        return None
    pick = min if mode == "min" else max
    return pick(usable, key=lambda item: item[1])[0]


def last_value(run: Path, metric: str):
    values = [r[metric] for r in compare.read_metrics(run) if metric in r]
    return values[-1] if values else None


def searched(search: list[dict]) -> bool:
    """Every lr of the grid has finished or failed."""
    return all(r["status"] in (FINISHED, FAILED) for r in search)


def chosen_lr(study: dict, search: list[dict]) -> float | None:
    """The lr search's choice, once it is complete."""
    if not searched(search):
        return None
    return choose_lr([(r["lr"], r["select_value"]) for r in search], study["select"]["mode"])


def no_lr_reason(study: dict, search: list[dict]) -> str:
    if not searched(search):
        return "the lr search has not finished"
    if all(r["status"] == FAILED for r in search):
        return "every lr failed"
    return f"no finished run logged {study['select']['metric']}"


def edge_note(lr: float | None, grid: list[float]) -> str | None:
    if lr is None or len(grid) < 2 or min(grid) < lr < max(grid):
        return None
    return f"lr {lr:g} is the {'smallest' if lr == min(grid) else 'largest'} of the grid: grid too narrow, " \
           f"try {'lower' if lr == min(grid) else 'higher'}"


def interpolate(x: float, points: list[tuple[float, float]]) -> float | None:
    """Linear interpolation through points sorted by x; None outside them."""
    for px, py in points:
        if px == x:
            return py
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 < x < x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def loss_at_tokens(curves: dict, budget: float | None) -> float | None:
    """Eval loss after `budget` training tokens: each eval at step s gets the
    cumulative `tokens` of the log row at step s (interpolated between log
    rows; 0 at step 0), then the loss is interpolated linearly in tokens."""
    if budget is None:
        return None
    logged = [(0, 0)] + list(zip(curves["tokens_step"], curves["tokens"]))
    points = [(tokens_at, loss) for step, loss in zip(curves["eval_loss_step"], curves["eval_loss"])
              if (tokens_at := interpolate(step, logged)) is not None]
    return interpolate(budget, sorted(points))


def likelihood_displacement(curves: dict) -> bool:
    """The chosen responses' log-prob at the last eval below the first by more
    than DISPLACED_SHARE of its magnitude, while the reward margin rose: the
    policy separates the pair by pushing both down."""
    chosen, margin = curves["chosen"], curves["margin"]
    return len(chosen) >= 2 and len(margin) >= 2 and margin[-1] > margin[0] and \
        chosen[0] - chosen[-1] > DISPLACED_SHARE * abs(chosen[0])


def margins_saturating(curves: dict) -> bool:
    """Reward accuracy >= SATURATED_ACCURACY at the last eval and the margin's
    gain per step over the last eval interval < SATURATED_RATE x its gain per
    step over the first: the pairs are separated and more steps buy little."""
    steps, margin, acc = curves["margin_step"], curves["margin"], curves["reward_acc"]
    if len(margin) < 3 or not acc or not acc[-1] >= SATURATED_ACCURACY or steps[1] == steps[0] or \
            steps[-1] == steps[-2]:
        return False
    first = (margin[1] - margin[0]) / (steps[1] - steps[0])
    last = (margin[-1] - margin[-2]) / (steps[-1] - steps[-2])
    return first > 0 and last < SATURATED_RATE * first


def run_notes(record: dict) -> list[str]:
    if record["status"] == FAILED:   # the error's first clause; the whole line is in study.json and STUDY_FAILED
        return [f"failed: {record['error'].split('; ')[0]}"]
    if record["status"] != FINISHED:
        return [record["status"]]
    curves = record["summary"]["_curves"]
    return [note for note, present in (("likelihood displacement", likelihood_displacement(curves)),
                                       ("margins saturating", margins_saturating(curves))) if present]


def run_record(study: dict, label: dict, lr: float, seed: int) -> dict:
    path = run_dir(study, label, lr, seed)
    status = run_state(path)
    record = {"label": label["label"], "lr": lr, "seed": seed, "path": str(path), "status": status,
              "error": failure(path), "summary": None, "select_value": None}
    if status == FINISHED:
        record["summary"] = compare.summarize(path, compare.DEFAULT_TARGET_LOSS)
        record["select_value"] = last_value(path, study["select"]["metric"])
    record["notes"] = run_notes(record)
    return record


def label_result(study: dict, label: dict, search: list[dict], seed_runs: list[dict], lr: float | None) -> dict:
    """One label: its lr, the statistics of each metric over its seed runs,
    the state bytes (exact: one value, flagged if the seeds disagree), notes."""
    done = [r for r in seed_runs if r["status"] == FINISHED]
    # eval_loss_at_budget is the record's own; every other metric is compare.py's summary's
    stats = {key: aggregate([r[key] if key in r else r["summary"][key] for r in done], study["confidence"])
             for key, _, _ in METRICS}
    state = sorted({r["summary"]["state_bytes"] for r in done} - {None})
    notes = [n for n in [edge_note(lr, label["grid"])] if n]
    failed_lrs = [f"{r['lr']:g}" for r in search if r["status"] == FAILED]
    if failed_lrs:
        notes.append(f"lr search: {', '.join(failed_lrs)} failed")
    if lr is None:
        notes.append(f"no lr chosen: {no_lr_reason(study, search)}")
    elif len(done) < len(seed_runs):
        notes.append(f"{len(done)}/{len(seed_runs)} seeds finished")
    if len(state) > 1:
        notes.append(f"state bytes differ across seeds: {', '.join(f'{b:,}' for b in state)}")
    kinds = Counter(note.split(":")[0] for r in seed_runs for note in r["notes"] if r["status"] in (FINISHED, FAILED))
    notes += [f"{count}/{len(seed_runs)} seeds: {kind}" for kind, count in kinds.items()]
    return {"label": label["label"], "optimizer": label["optimizer"], "lr": lr, "grid": label["grid"],
            "seeds": [r["seed"] for r in done], "state_bytes": state[-1] if state else None, "stats": stats,
            "notes": notes}


def search_records(study: dict, label: dict) -> list[dict]:
    return [run_record(study, label, lr, study["seeds"][0]) for lr in label["grid"]]


def collect(study: dict) -> dict:
    """Every run of the study as a record, and every label's result. The
    equal-tokens budget is the smallest final `tokens` over all seed runs."""
    per_label = []
    for label in study["labels"]:
        search = search_records(study, label)
        lr = chosen_lr(study, search)
        seed_runs = [r for r in search if r["lr"] == lr] + [run_record(study, label, lr, s)
                                                            for s in study["seeds"][1:] if lr is not None]
        for r in search:
            r["role"] = "lr search, chosen" if r["lr"] == lr else "lr search"
        for r in seed_runs[1:]:
            r["role"] = "seed"
        per_label.append((label, search, seed_runs, lr))
    runs = [r for _, search, seed_runs, _ in per_label for r in search + seed_runs[1:]]
    finals = [r["summary"]["_curves"]["tokens"][-1] for _, _, seed_runs, _ in per_label for r in seed_runs
              if r["status"] == FINISHED and r["summary"]["_curves"]["tokens"]]
    budget = min(finals) if finals else None
    for r in runs:
        r["eval_loss_at_budget"] = loss_at_tokens(r["summary"]["_curves"], budget) if r["summary"] else None
    return {"budget": budget, "labels": [label_result(study, *item) for item in per_label], "runs": runs,
            "seed_runs": {label["label"]: seed_runs for label, _, seed_runs, _ in per_label}}


# ----------------------------------------------------------------------------
# Outputs: tables, JSON, the two figures, wandb.

def cell(stats: dict, fmt: str) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = format(stats["mean"], fmt)
    return text + (f" ± {format(stats['half_width'], fmt.lstrip('+'))}" if stats["half_width"] is not None else "")


def label_table(result: dict, markdown: bool = True) -> str:
    budget = result["budget"]
    headers = ["optimizer", "lr", "seeds"] + [h.format(budget=f"{budget:,}" if budget else "n/a")
                                              for _, h, _ in METRICS] + ["state bytes", "notes"]
    rows = [[x["label"], "n/a" if x["lr"] is None else f"{x['lr']:g}", str(len(x["seeds"]))]
            + [cell(x["stats"][key], fmt) for key, _, fmt in METRICS]
            + ["n/a" if x["state_bytes"] is None else f"{x['state_bytes']:,}", "; ".join(x["notes"]) or "-"]
            for x in result["labels"]]
    return compare.render_table(headers, rows, markdown, left={"optimizer", "notes"})


def runs_table(result: dict) -> str:
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    budget = f"{result['budget']:,}" if result["budget"] else "n/a"
    headers = ["optimizer", "lr", "seed", "role", "status", "select value", "eval loss", f"eval loss @ {budget} tokens",
               "reward acc", "margin", "chosen drift", "state bytes", "tokens/s", "notes"]
    rows = []
    for r in result["runs"]:
        s = r["summary"] or {}
        rows.append([r["label"], f"{r['lr']:g}", str(r["seed"]), r["role"], r["status"], num(r["select_value"], ".4f"),
                     num(s.get("eval_loss"), ".4f"), num(r["eval_loss_at_budget"], ".4f"),
                     num(s.get("reward_acc"), ".3f"), num(s.get("reward_margin"), ".3f"),
                     num(s.get("chosen_drift"), "+.2f"), num(s.get("state_bytes"), ",d"),
                     num(s.get("tokens_per_s"), ".0f"), "; ".join(r["notes"]) or "-"])
    return compare.render_table(headers, rows, markdown=True)


def pareto_front(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The (label, bytes, loss) points no other point beats on both (fewer or
    equal bytes and lower or equal loss, one of them strictly), by bytes."""
    def beaten(p):
        return any(q[1] <= p[1] and q[2] <= p[2] and (q[1] < p[1] or q[2] < p[2]) for q in points)

    return sorted((p for p in points if not beaten(p)), key=lambda p: (p[1], p[2]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_pareto(result: dict, path: Path) -> None:
    """Final eval loss (mean, t-interval bars) against optimizer-state bytes
    (symlog: 0 bytes shows), marker area proportional to tokens/s, and the
    Pareto front as a step line."""
    plt = _pyplot()
    rows = [x for x in result["labels"] if x["state_bytes"] is not None and x["stats"]["eval_loss"]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(9, 6))
    fastest = max((x["stats"]["tokens_per_s"]["mean"] or 0 for x in rows), default=0) or 1
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
    for i, x in enumerate(rows):
        loss, speed = x["stats"]["eval_loss"], x["stats"]["tokens_per_s"]["mean"] or 0
        ax.errorbar(x["state_bytes"], loss["mean"], yerr=loss["half_width"] or 0, fmt="none", ecolor="grey", capsize=3)
        ax.scatter(x["state_bytes"], loss["mean"], s=max(600 * speed / fastest, 10), color=colors[i % len(colors)],
                   alpha=0.75, edgecolors="black", linewidths=0.5, zorder=3)
        ax.annotate(x["label"], (x["state_bytes"], loss["mean"]), xytext=(7, 7), textcoords="offset points", fontsize=9)
    front = pareto_front([(x["label"], x["state_bytes"], x["stats"]["eval_loss"]["mean"]) for x in rows])
    if front:   # a staircase: each front point's loss holds until the next one's bytes, then to the right edge
        xs = [p[1] for p in front] + [max(x["state_bytes"] for x in rows)]
        ax.step(xs, [p[2] for p in front] + [front[-1][2]], where="post", color="black", ls="--", lw=1,
                label="Pareto front (no optimizer has both fewer bytes and lower loss)")
        ax.legend(loc="upper right", fontsize=8)
    positive = [x["state_bytes"] for x in rows if x["state_bytes"] > 0]
    ax.set_xscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive)) - 1) if positive else 1)
    losses = [x["stats"]["eval_loss"]["mean"] for x in rows]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.set(xlabel="optimizer state bytes (exact; symlog axis: 0 shows)",
           ylabel=f"final eval loss, mean ± {result['confidence']:.0%} t-interval over seeds",
           title=f"study {result['name']}: final eval loss (lower is better) vs optimizer-state bytes\n"
                 "marker area ∝ tokens/s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_curves(result: dict, path: Path) -> None:
    """Eval loss and chosen log-prob by step: per label the mean over its seed
    runs and a band from their min to their max."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    colors = plt.get_cmap("tab10" if len(result["labels"]) <= 10 else "tab20").colors
    for i, x in enumerate(result["labels"]):
        runs = [r["summary"]["_curves"] for r in result["seed_runs"][x["label"]] if r["status"] == FINISHED]
        for ax, key in zip(axes, ("eval_loss", "chosen")):
            curves = [c for c in runs if c[key] and c[f"{key}_step"] == runs[0][f"{key}_step"]]
            if not curves:
                continue
            steps, columns = curves[0][f"{key}_step"], list(zip(*(c[key] for c in curves)))
            color = colors[i % len(colors)]
            ax.plot(steps, [statistics.fmean(v) for v in columns], color=color, label=f"{x['label']} (n={len(curves)})")
            ax.fill_between(steps, [min(v) for v in columns], [max(v) for v in columns], color=color, alpha=0.2)
    for ax, title in zip(axes, ("eval loss (loss/eval)", "chosen log-prob (logps_eval/chosen)")):
        ax.set(title=f"{title}: seed mean, min-max band", xlabel="optimizer step")
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def wandb_settings(train: list[str]) -> tuple[str, str] | None:
    """(mode, project) the study's runs log to wandb with (the last
    wandb.mode= / wandb.project= in `train`, else train.py's defaults
    offline / prefopt); None when they do not log to wandb."""
    found = {"wandb.mode": "offline", "wandb.project": "prefopt"}
    for o in train:
        key, value = o.split("=", 1)
        if key in found:
            found[key] = value
    return None if found["wandb.mode"] == "disabled" else (found["wandb.mode"], found["wandb.project"])


def log_to_wandb(study: dict, result: dict, pngs: list[Path]) -> str | None:
    """The study as one more wandb run in the sweep's group: the per-label
    table, loss vs state bytes as a scatter plot, and the PNGs."""
    settings = wandb_settings(study["train"])
    if settings is None:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    columns = ["optimizer", "lr", "seeds", "state_bytes", *(f"{key}_{part}" for key, _, _ in METRICS
                                                            for part in ("mean", "low", "high")), "notes"]
    data = [[x["label"], x["lr"], len(x["seeds"]), x["state_bytes"],
             *(x["stats"][key][part] for key, _, _ in METRICS for part in ("mean", "low", "high")),
             "; ".join(x["notes"])] for x in result["labels"]]
    run = wandb.init(mode=settings[0], project=settings[1], group=study["name"], name=f"study-{study['name']}",
                     job_type="study", dir=str(study["out"]), config={"study": result["study"]},
                     settings=wandb.Settings(silent=True))
    table = wandb.Table(columns=columns, data=data)
    run.log({"study/summary": table,
             "study/pareto": wandb.plot.scatter(table, "state_bytes", "eval_loss_mean",
                                                title="final eval loss (lower is better) vs optimizer-state bytes"),
             **{f"study/{png.stem}": wandb.Image(str(png)) for png in pngs}})
    where = Path(run.dir).parent   # the offline-run-* (or run-*) folder
    run.finish()
    return str(where)


def public(record: dict) -> dict:
    """A run record for study.json: the summary's curves under `curves`."""
    summary = dict(record["summary"] or {})
    curves = summary.pop("_curves", None)
    return {**{k: v for k, v in record.items() if k != "summary"}, "summary": summary or None, "curves": curves}


def report(study: dict, command: str) -> dict:
    """Read every run, write study.md, study.json, pareto.png, curves.png (and
    the wandb run), print the table and the paths."""
    if not study["out"].is_dir():
        raise StudyError(f"{_shown_path(study['out'])} does not exist: nothing has run yet; run: {command}")
    result = collect(study)
    result.update(name=study["name"], confidence=study["confidence"], command=command,
                  study={k: str(v) if isinstance(v, Path) else v for k, v in study.items()})
    out = study["out"]
    pngs = [out / "pareto.png", out / "curves.png"]
    write_pareto(result, pngs[0])
    write_curves(result, pngs[1])
    (out / "study.md").write_text(markdown(study, result))
    (out / "study.json").write_text(json.dumps({
        **{k: v for k, v in result.items() if k not in ("runs", "seed_runs")},
        "runs": [public(r) for r in result["runs"]]}, indent=1, default=str) + "\n")
    wandb_dir = log_to_wandb(study, result, pngs)
    print(f"\n{label_table(result, markdown=False)}\n")
    for path in [out / "study.md", out / "study.json", *pngs]:
        print(f"wrote: {_shown_path(path)}")
    if wandb_dir:
        print(f"wandb: {_shown_path(Path(wandb_dir))} (run `study-{study['name']}` in group {study['name']}; "
              f"upload an offline run with: wandb sync {_shown_path(Path(wandb_dir))})")
    return result


def markdown(study: dict, result: dict) -> str:
    s, seeds = study["select"], study["seeds"]
    budget = f"{result['budget']:,}" if result["budget"] else "n/a"
    return f"""# Study {study['name']}

Made by `{result['command']}`. Per optimizer: the lr grid at seed {seeds[0]}, the lr with the
{'lowest' if s['mode'] == 'min' else 'highest'} `{s['metric']}` at the last eval, then seeds {seeds[1:]} at that lr.
Cells: mean ± half-width of the {study['confidence']:.0%} Student-t interval over the seeds (one seed: the
value alone). "eval loss" is at the last eval (equal steps); "eval loss @ {budget} tokens" is interpolated at
the smallest final training-token count of the seed runs (equal tokens). Health notes: docs/study.md.

{label_table(result)}

![final eval loss vs optimizer state bytes](pareto.png)

![learning curves](curves.png)

## Every run

{runs_table(result)}
"""


def _shown_path(path: Path) -> str:
    """Relative to the current folder when inside it: shorter lines."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


# ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a study name (config/study/<name>.yaml) or a YAML file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print what would run; run and write nothing")
    mode.add_argument("--report-only", action="store_true", help="rebuild the outputs from the run dirs only")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        if not args.report_only:
            run_study(study, dry_run=args.dry_run)
        if not args.dry_run:
            report(study, shlex.join(["python", "study.py", args.study]))
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\nerror: interrupted (Ctrl-C); run the same command to go on", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
