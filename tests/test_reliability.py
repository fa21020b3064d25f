"""Reliability probes: what an unlucky or hostile user tries, and what happens now.

Each probe runs `python train.py ...` as real subprocesses in its own scratch
folder (most start from a copy of one small finished run). The probes run a
few at a time (most of each is Python start-up); each is reported as its own
test. `python tests/test_reliability.py` prints docs/reliability.md from the
probe table below; a test checks that the doc is current.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
SMALL = ["wandb.mode=disabled", "model.config.hidden_size=32", "model.config.intermediate_size=64",
         "model.config.num_hidden_layers=1", "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
         "batch_size=8", "n_eval_examples=8", "n_eval_generations=0", "log_every=1", "dataset.n_train=128"]
BASE = ["max_steps=4", "save_every=2"]   # the shared finished run: checkpoints step-2 and step-4


def train(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SMALL, *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def error_line(r) -> str:
    lines = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    return lines[-1] if lines else ""


def refused(r, status: int, text: str) -> None:
    """Exit status `status`, no traceback, and one `error:` line containing `text`."""
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert text in error_line(r), r.stderr[-3000:]


def ok(r) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints_in(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


def latest(run: Path) -> str:
    return (run / "checkpoints" / "LATEST").read_text().strip()


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# ----------------------------------------------------------------------------
# The probes. Each takes (scratch folder, path of a copy of the base run).

PROBES = []


def probe(item: str, tried: str, happens: str):
    def register(fn):
        PROBES.append((fn.__name__, item, tried, happens, fn))
        return fn
    return register


@probe("1", "a fresh run into a folder that holds someone's files",
       "refused before anything is written: `is not empty (notes.txt) and is not a prefopt run`; the files are untouched")
def foreign_folder(tmp, run):
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    refused(train(tmp, "run_dir=mine"), 2, "is not empty (notes.txt) and is not a prefopt run")
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["notes.txt"]


@probe("1", "a fresh run (no `resume=true`) into the folder of an earlier prefopt run",
       "refused: `already holds a prefopt run (last checkpoint step-4); add resume=true`; nothing overwritten")
def earlier_run_without_resume(tmp, run):
    before = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    refused(train(tmp, f"run_dir={run}", "max_steps=2"), 2, "already holds a prefopt run (last checkpoint step-4)")
    assert ((run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()) == before


@probe("1", "`keep_last=1` on resume, with foreign `checkpoints/step-3/` and `step-100/` dropped into the run",
       "only the run's own old checkpoints are deleted; the foreign ones stay; LATEST names a folder that exists; "
       "a second resume works")
def keep_last_deletes_only_own(tmp, run):
    for name in ("step-3", "step-100"):
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "theirs.txt").write_text("not prefopt's")
    ok(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "save_every=2", "keep_last=1"))
    assert checkpoints_in(run) == ["step-100", "step-3", "step-6"]
    assert latest(run) == "step-6"
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=8", "save_every=2", "keep_last=1")
    ok(r)
    assert "resumed from" in r.stderr and "step-6" in r.stderr
    assert checkpoints_in(run) == ["step-100", "step-3", "step-8"]


@probe("1", "a foreign folder with the very name of the next checkpoint (`checkpoints/step-6/`)",
       "refused at that save: `exists and was not written by this run; it was left as it is`; the previous "
       "checkpoint stays LATEST")
def foreign_folder_with_checkpoint_name(tmp, run):
    (run / "checkpoints" / "step-6").mkdir()
    (run / "checkpoints" / "step-6" / "theirs.txt").write_text("x")
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "save_every=2")
    refused(r, 3, "exists and was not written by this run; it was left as it is")
    assert (run / "checkpoints" / "step-6" / "theirs.txt").read_text() == "x"
    assert latest(run) == "step-4"


@probe("1", "`resume=true` on a folder that is not a prefopt run",
       "refused: `is not a prefopt run (no prefopt_run.json or config.yaml)`")
def resume_foreign_folder(tmp, run):
    (tmp / "theirs" / "checkpoints" / "step-1").mkdir(parents=True)
    refused(train(tmp, "run_dir=theirs", "resume=true"), 2, "is not a prefopt run")


@probe("3", "`resume=true` with a changed `lr`",
       "refused: `resume=true would change lr (0.001 -> 0.01), which cannot change mid-run`")
def resume_changed_lr(tmp, run):
    refused(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "lr=0.01"), 2,
            "resume=true would change lr (0.001 -> 0.01), which cannot change mid-run")


@probe("3", "`resume=true` with a changed `optimizer` (was a `KeyError: 'momentum'` traceback)",
       "refused, naming `optimizer.name ('AdamW' -> 'SGD')`")
def resume_changed_optimizer(tmp, run):
    refused(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "optimizer=SGD", "lr=0.001"), 2,
            "optimizer.name ('AdamW' -> 'SGD')")


@probe("3", "`resume=true` with a changed `batch_size`, `loss`, `seed` or dataset",
       "each refused, naming the key: `batch_size (8 -> 16)`, `loss.name`, `seed (0 -> 1)`, `dataset.n_train`")
def resume_changed_run_keys(tmp, run):
    for override, named in (("batch_size=16", "batch_size (8 -> 16)"), ("loss=sft", "loss.name ('dpo' -> 'sft')"),
                            ("seed=1", "seed (0 -> 1)"), ("dataset.n_train=256", "dataset.n_train (128 -> 256)")):
        refused(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", override), 2, named)


@probe("3", "`resume=true max_steps=8 keep_last=2` (extending a run, constant schedule)",
       "accepted; `config.yaml` records the new values under a `# resume 1 (from step-4): keep_last 0 -> 2, "
       "max_steps 4 -> 8` line, and `prefopt_run.json` keeps the history")
def resume_extends_run(tmp, run):
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=8", "save_every=2", "keep_last=2")
    ok(r)
    text = (run / "config.yaml").read_text()
    assert "# resume 1 (from step-4): keep_last 0 -> 2, max_steps 4 -> 8" in text
    assert "max_steps: 8" in text and "keep_last: 2" in text
    manifest = json.loads((run / "prefopt_run.json").read_text())
    assert manifest["resumes"] == [{"from": "step-4", "changed": {"keep_last": [0, 2], "max_steps": [4, 8]}}]
    assert max(m["step"] for m in metrics(run)) == 8


@probe("3", "`resume=true` extending `max_steps` of a run with `scheduler=cosine`",
       "refused: its learning rates were planned for the old length")
def resume_extends_cosine(tmp, run):
    cos = tmp / "cos"
    ok(train(tmp, f"run_dir={cos}", "max_steps=4", "scheduler=cosine"))
    refused(train(tmp, f"run_dir={cos}", "resume=true", "max_steps=8", "scheduler=cosine"), 2,
            "would change max_steps (4 -> 8) under scheduler=cosine")


@probe("3", "`resume=true max_steps=3` on a run already at step 4",
       "refused: `is at step 4, past max_steps=3`")
def resume_below_step(tmp, run):
    refused(train(tmp, f"run_dir={run}", "resume=true", "max_steps=3"), 2, "is at step 4, past max_steps=3")


@probe("4", "two runs started in one `run_dir` at the same time",
       "the second is refused in one line naming the first one's pid; the first finishes undisturbed")
def two_runs_one_dir(tmp, run):
    first = start(tmp, "run_dir=shared", "max_steps=400")
    lock = tmp / "shared" / ".prefopt.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().strip().isdigit(), first)
    second = train(tmp, "run_dir=shared", "max_steps=2")
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=180)
    refused(second, 2, f"is in use by another prefopt run (pid {first.pid})")
    assert first.returncode == 0, err[-3000:]


@probe("4", "`kill -9` of a run, then `resume=true` (the lock file is still there)",
       "the kernel released the dead run's lock: the resume runs")
def stale_lock_does_not_block(tmp, run):
    proc = start(tmp, "run_dir=killed", "max_steps=400", "save_every=2")
    wait_for(lambda: (tmp / "killed" / "checkpoints" / "LATEST").is_file(), proc)
    proc.kill()
    proc.wait()
    assert (tmp / "killed" / ".prefopt.lock").is_file()
    step = int(latest(tmp / "killed").split("-")[1])
    ok(train(tmp, "run_dir=killed", "resume=true", "save_every=2", f"max_steps={step + 2}"))


@probe("5", "the disk fills up while a checkpoint is written (a small tmpfs, or a simulated `ENOSPC` where "
       "mounting is not allowed)",
       "one line: `disk full: writing checkpoint step-4 to ... the disk mounted at ... has N MiB free and this needs "
       "about M MiB`; step-2 intact and LATEST; no temporary folder left")
def disk_full_during_checkpoint(tmp, run):
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step-2").rglob("*") if f.is_file())
    disk = tmp / "disk"
    disk.mkdir()
    # room for one checkpoint (and the small files), not two
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs",
                              str(disk)], capture_output=True).returncode == 0
    env_args = []
    try:
        if not mounted:   # no mount permission: fail the second checkpoint write with ENOSPC
            (tmp / "sitecustomize.py").write_text(FAKE_FULL_DISK)
            env_args = ["PYTHONPATH=" + str(tmp)]
        r = subprocess.run(["env", *env_args, sys.executable, str(ROOT / "train.py"), *SMALL, f"run_dir={disk / 'run'}",
                            *BASE], cwd=tmp, capture_output=True, text=True, timeout=300)
        refused(r, 3, "disk full: writing checkpoint step-4 to")
        assert "MiB free and this needs about" in error_line(r) and "step-2 (intact)" in error_line(r)
        assert latest(disk / "run") == "step-2"
        assert checkpoints_in(disk / "run") == ["step-2"]
        assert not list((disk / "run" / "checkpoints").glob(".*tmp*"))
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


FAKE_FULL_DISK = """
import errno, safetensors.torch
_save, _calls = safetensors.torch.save_file, []
def save_file(*a, **k):
    _calls.append(1)
    if len(_calls) > 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return _save(*a, **k)
safetensors.torch.save_file = save_file
"""


@probe("5", "`metrics.jsonl` ends in half a line (the disk filled or the process died mid-write), then `resume=true`",
       "the resume drops the torn line with one warning and continues (was a `JSONDecodeError` traceback)")
def torn_metrics_line(tmp, run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/tr')
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=6")
    ok(r)
    assert "had 1 unreadable line(s)" in r.stderr
    assert [m["step"] for m in metrics(run)][-1] == 6


@probe("6", "`kill -9` during a save leaves `checkpoints/.step-6.tmp-<pid>/`; then `resume=true`",
       "the stale temporary folder is removed at start")
def stale_temporary_removed(tmp, run):
    stale = run / "checkpoints" / ".step-6.tmp-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    ok(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6"))
    assert not stale.exists()


@probe("6", "SIGTERM to a run whose `run_dir` has a space and a comma, then paste the printed \"Resume with:\" line",
       "the printed command names `run_dir` once, quoted for the shell and for Hydra; pasted into bash it resumes")
def resume_line_pastes(tmp, run):
    folder = tmp / "my runs" / "a,b"
    proc = start(tmp, "run_dir='my runs/a,b'", "max_steps=30", "save_every=1000")
    wait_for(lambda: (folder / "metrics.jsonl").is_file() and len((folder / "metrics.jsonl").read_text().splitlines()) >= 3,
             proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    line = [x for x in err.splitlines() if "Resume with: " in x][-1].split("Resume with: ", 1)[1]
    assert line.count("run_dir=") == 1 and line.startswith("python train.py ")
    pasted = line.replace("python train.py", f"{sys.executable} {ROOT / 'train.py'}", 1)
    r = subprocess.run(["bash", "-c", pasted], cwd=tmp, capture_output=True, text=True, timeout=300)
    ok(r)
    assert "resumed from" in r.stderr and metrics(folder)[-1]["step"] == 30


@probe("6", "Ctrl-C (SIGINT) during setup",
       "one line `interrupted (Ctrl-C) outside the training loop`, exit status 130, no traceback")
def ctrl_c_during_setup(tmp, run):
    proc = start(tmp, "run_dir=r", "max_steps=2")
    time.sleep(1.0)   # still importing torch or building the model
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted (Ctrl-C) outside the training loop" in err


@probe("11", "`optimizer=SGD lr=1e12 save_every=1` (weights reach ~1e9 but stay finite)",
       "stopped before the first checkpoint: `training diverged at step 1: the parameter norm is ...x its starting "
       "value`; no checkpoint of the destroyed weights")
def divergence_sgd_huge_lr(tmp, run):
    r = train(tmp, "run_dir=r", "optimizer=SGD", "lr=1e12", "max_steps=20", "save_every=1")
    refused(r, 3, "training diverged at step 1: the parameter norm is")
    assert not (tmp / "r" / "checkpoints" / "LATEST").exists()


@probe("11", "`optimizer=AdamW lr=1e6` (gradient norm collapses to 0 from step 2; used to exit 0)",
       "stopped at the first log step: `training diverged ... parameter norm`")
def divergence_adamw_huge_lr(tmp, run):
    refused(train(tmp, "run_dir=r", "lr=1e6", "max_steps=20"), 3, "training diverged at step 1: the parameter norm")


@probe("11", "`divergence.action=warn` on the same AdamW run",
       "the run goes on and exits 0, with `warning: training looks diverged` lines")
def divergence_warn(tmp, run):
    r = train(tmp, "run_dir=r", "lr=1e6", "max_steps=3", "divergence.action=warn")
    ok(r)
    assert "warning: training looks diverged at step 1" in r.stderr


@probe("extra", "`checkpoints/LATEST` names a folder someone deleted, then `resume=true`",
       "the newest checkpoint of the run that still exists is used")
def latest_names_deleted_folder(tmp, run):
    shutil.rmtree(run / "checkpoints" / "step-4")
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=4")
    ok(r)
    assert "resumed from" in r.stderr and "step-2 at step 2" in r.stderr


@probe("extra", "`prefopt_run.json` (the list of what the run wrote) is damaged, then `resume=true keep_last=1`",
       "refused in one line; nothing is deleted")
def damaged_manifest(tmp, run):
    (run / "prefopt_run.json").write_text("{not json")
    refused(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "keep_last=1"), 2,
            "prefopt_run.json is damaged")
    assert checkpoints_in(run) == ["step-2", "step-4"]


@probe("extra", "`metrics.jsonl` deleted, then `resume=true`",
       "the resume continues and writes the new lines")
def metrics_deleted(tmp, run):
    (run / "metrics.jsonl").unlink()
    ok(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6"))
    assert [m["step"] for m in metrics(run)][-1] == 6


@probe("extra", "`model.safetensors` of the newest checkpoint truncated, then `resume=true`",
       "`warning: checkpoint .../step-4 is damaged ...; trying the previous one`; resumes from step-2")
def truncated_weights(tmp, run):
    weights = run / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=4")
    ok(r)
    assert "step-4 is damaged" in r.stderr and "step-2 at step 2" in r.stderr


@probe("extra", "`training_state.pt` replaced by a pickle that would write a marker file",
       "not executed (`weights_only=True`): the checkpoint is reported damaged and the previous one used")
def malicious_training_state(tmp, run):
    import pickle

    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run / "checkpoints" / "step-4" / "training_state.pt").write_bytes(pickle.dumps(Payload()))
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=4")
    ok(r)
    assert not marker.exists() and "step-4 is damaged" in r.stderr


@probe("extra", "`resume=true` with `trainer=fsdp` on a run written by `trainer=basic`",
       "refused: `trainer.name ('basic' -> 'fsdp')`")
def resume_other_trainer(tmp, run):
    refused(train(tmp, f"run_dir={run}", "resume=true", "trainer=fsdp", "max_steps=6"), 2,
            "trainer.name ('basic' -> 'fsdp')")


@probe("extra", "`resume=true` with the model changed (`model.config.hidden_size=64`)",
       "refused: `model.config.hidden_size (32 -> 64)`")
def resume_other_model(tmp, run):
    refused(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "model.config.hidden_size=64"), 2,
            "model.config.hidden_size (32 -> 64)")


@probe("extra", "`resume=true` of a finished run with the same `max_steps`",
       "exits 0 at once: nothing left to train, nothing rewritten")
def resume_finished_run(tmp, run):
    before = checkpoints_in(run)
    ok(train(tmp, f"run_dir={run}", "resume=true", "max_steps=4"))
    assert checkpoints_in(run) == before and [m["step"] for m in metrics(run)][-1] == 4


@probe("extra", "`run_dir` inside the folder of another prefopt run (`run_dir=<run>/nested`)",
       "accepted only as an empty, new folder: the other run's files are untouched")
def nested_run_dir(tmp, run):
    before = checkpoints_in(run)
    ok(train(tmp, f"run_dir={run / 'nested'}", "max_steps=2"))
    assert checkpoints_in(run) == before


@probe("extra", "a fresh run with `save_every=1 keep_last=1`",
       "one checkpoint left, the last; `prefopt_run.json` lists exactly it")
def keep_last_in_a_fresh_run(tmp, run):
    ok(train(tmp, "run_dir=r", "max_steps=3", "save_every=1", "keep_last=1"))
    assert checkpoints_in(tmp / "r") == ["step-3"]
    assert json.loads((tmp / "r" / "prefopt_run.json").read_text())["checkpoints"] == ["step-3"]


@probe("extra", "`resume=true log_every=2` (a key that may change)",
       "accepted and recorded: `# resume 1 (from step-4): log_every 1 -> 2`")
def resume_records_log_every(tmp, run):
    ok(train(tmp, f"run_dir={run}", "resume=true", "max_steps=4", "log_every=2"))
    assert "# resume 1 (from step-4): log_every 1 -> 2" in (run / "config.yaml").read_text()


@probe("extra", "`config.yaml` deleted, then `resume=true lr=0.01`",
       "still refused: the checkpoint's own `run_config.yaml` is what the resume is compared with")
def resume_without_config_yaml(tmp, run):
    (run / "config.yaml").unlink()
    refused(train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "lr=0.01"), 2, "would change lr (0.001 -> 0.01)")


@probe("extra", "`checkpoints/LATEST` holds garbage (`step-abc`), then `resume=true`",
       "the newest checkpoint of the run is used")
def latest_is_garbage(tmp, run):
    (run / "checkpoints" / "LATEST").write_text("step-abc\n")
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=4")
    ok(r)
    assert "step-4 at step 4" in r.stderr


@probe("extra", "`prefopt_run.json` lists `step-6`, whose save was killed before its folder was renamed",
       "the resume ignores the missing folder and continues from step-4; the next save writes step-6")
def manifest_lists_unfinished_checkpoint(tmp, run):
    manifest = json.loads((run / "prefopt_run.json").read_text())
    manifest["checkpoints"].append("step-6")
    (run / "prefopt_run.json").write_text(json.dumps(manifest))
    r = train(tmp, f"run_dir={run}", "resume=true", "max_steps=6", "save_every=2")
    ok(r)
    assert "step-4 at step 4" in r.stderr and latest(run) == "step-6"


def _by_name():
    return {name: fn for name, _, _, _, fn in PROBES}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    r = train(root, "run_dir=run", *BASE)
    ok(r)
    return root / "run"


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, base_run):
    """The selected probes, three at a time; {name: None or the exception it raised}."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_probe"]

    def run_one(name):
        tmp = tmp_path_factory.mktemp(name)
        run = tmp / "base run"
        shutil.copytree(base_run, run, symlinks=True)
        (run / ".prefopt.lock").unlink(missing_ok=True)
        try:
            _by_name()[name](tmp, run)
            return None
        except BaseException as e:  # reported by the probe's own test
            return e

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(selected, pool.map(run_one, selected)))


@pytest.mark.parametrize("name", [p[0] for p in PROBES])
def test_probe(outcomes, name):
    if outcomes[name] is not None:
        raise outcomes[name]


def doc_text() -> str:
    rows = "\n".join(f"| {i} | {item} | {tried} | {happens} | `{name}` |"
                     for i, (name, item, tried, happens, _) in enumerate(PROBES, 1))
    return DOC_HEAD + "| # | issue item | what was tried | what happens now | probe |\n|---|---|---|---|---|\n" + rows + "\n" + DOC_TAIL


DOC_HEAD = """# Reliability

A run must never lose a user's work, mix two runs in one, or run code it
loaded from a file. What prefopt does for that:

- **Checkpoints** (`save_every=<n>`, and always at the end) are written to a
  temporary folder, fsynced and renamed, then `checkpoints/LATEST` is
  replaced atomically: a `step-<n>/` folder is complete or absent. Each holds
  the Hugging Face export, the training state and `run_config.yaml` (the
  config it ran with).
- **The run directory belongs to one run.** A fresh run refuses a folder that
  already holds files (someone's folder, or another run: add `resume=true` to
  continue that one). `prefopt_run.json` lists the checkpoints this run wrote;
  `keep_last=<n>` deletes only those, never the one `LATEST` names, and never
  overwrites a folder the run did not write. An OS lock (`.prefopt.lock`,
  holding the pid) is held for the whole run: a second run in the same folder
  is refused naming the first one's pid; the kernel drops the lock when a run
  dies, so `kill -9` never blocks a resume. Temporary files a killed save
  left behind are removed at the next start.
- **`resume=true`** continues from `LATEST` (a damaged checkpoint is reported
  and the previous one used): weights, optimizer state (any registry
  optimizer), LR schedule, counters, RNG states, data position and the partly
  filled log window. A run killed with `kill -9` and resumed writes the same
  `metrics.jsonl`, bit for bit, as one never interrupted
  (`tests/test_resume.py`). The new config is compared with the
  checkpoint's: keys that change what is computed (lr, optimizer, loss, data,
  batch size, seed, model, precision, trainer, ...) are refused by name; keys
  that only say when or how often things happen (`max_steps` to extend a run
  with `scheduler=constant`, `log_every`, `eval_every`, `save_every`,
  `keep_last`, `eval_batch_size`, `compile`, `trainer.nproc`, `wandb.*`,
  `divergence.*`) are accepted, and `config.yaml` records them under a
  `# resume <n> (from step-<k>): ...` line (the history is in
  `prefopt_run.json`). A torn last line of `metrics.jsonl` is dropped.
- **Signals.** SIGTERM or Ctrl-C in training finish the step, save a
  checkpoint and exit 0 with a "Resume with:" command that can be pasted as
  printed; a second one exits at once. Ctrl-C during setup is one line, exit
  130.
- **A full disk** while a checkpoint or a metrics line is written is one line
  naming the disk, its free space and what the write needed (exit 3); the
  previous checkpoint stays intact and `LATEST`.
- **Numbers that go wrong.** A NaN/inf loss or gradient norm stops the run
  before the weights change (`nonfinite=stop`, the default) or skips that
  update (`nonfinite=skip`). The divergence guard (`divergence.*`,
  `prefopt/divergence.py`) watches what stays finite but is destroyed, at each log
  step and before each checkpoint: the parameter norm above
  `param_norm_factor` (100) times its starting value, or the training loss
  above `loss_factor` (10) times its first logged value for `patience` (3) log
  windows in a row; `action=stop` (the default) ends the run with the numbers
  and writes no checkpoint of those weights, `warn` only prints, `off` turns
  it off.
- **No code from files.** Checkpoints load with safetensors and
  `torch.load(weights_only=True)`; the FSDP trainer's DCP metadata through a
  restricted unpickler that builds only DCP's own record types
  (`prefopt/distributed/safe_dcp.py`); `model.trust_remote_code` is false unless set.
- **Bad input is one line.** The whole config (every job of a `-m` sweep) is
  checked before any model or data is loaded; [bad_inputs.md](bad_inputs.md)
  lists each bad input with its exact message (tested). Malformed data rows
  name the file, row and field (`data.skip_bad_rows=true` skips and counts
  them); a dataset whose pairs all have `chosen == rejected` is refused, some
  such pairs are dropped and counted, and prompts shared by the train and eval
  splits are reported.

## Probes

What an unlucky or hostile user tries, and what prefopt does now. Each row is a
probe in `tests/test_reliability.py`, run as real `python train.py`
subprocesses in a scratch folder (most from a copy of one small finished run)
by the test suite; "issue item" refers to the reliability issue's list (the
items tested in other files are listed below the table). Regenerate this page
with `python tests/test_reliability.py > docs/reliability.md`.

"""

DOC_TAIL = """
Tested elsewhere, also as real subprocesses:

| issue item | what was tried | what happens now | test |
|---|---|---|---|
| 2 | a pickle payload at `checkpoints/step-N/dcp/.metadata`, then `trainer=fsdp resume=true` | DCP metadata is read with a restricted unpickler: refused, the payload never runs | `tests/test_dcp_pickle.py` |
| 7 | `-m max_steps=2,ten`, `-m lr=1e-3,-0.1` | every job's config is checked before the first job starts | `tests/test_command_line.py` |
| 8 | `optimizer=SGD optimizer.momentum=0.9 lr=0.05`, `optimizer.betas=[0.9]` | the first trains; the second is one line | `tests/test_command_line.py` |
| 9 | every command in README.md and docs/ | run in order in a fresh copy of the repo | `tests/test_docs_commands.py` |
| 10 | every pair `chosen == rejected`; rows in both splits; a lone UTF-16 surrogate | refused / counted and reported / a bad row | `tests/test_data_checks.py` |
| 12 | a tokenizer that adds BOS | BOS first, as the tokenizer does (`data.add_bos`) | `tests/test_data_checks.py` |
| 13 | `--cfg job`, `-c job`, `--resolve`, `--info`, `--help`, `-m` | Hydra's flags pass the pre-check | `tests/test_command_line.py` |
| 14 | gradient ascent, a dropped `decay_shift`, weight decay skipped under FSDP | each fails a test | `tests/test_learning.py`, `tests/test_adam_mini.py`, `tests/test_fsdp.py` |

The 40 bad inputs of [bad_inputs.md](bad_inputs.md) are probes of the same kind.
"""


def test_doc_is_current():
    assert DOC.read_text() == doc_text(), "docs/reliability.md is out of date: python tests/test_reliability.py > docs/reliability.md"


def test_there_are_enough_probes():
    assert len(PROBES) >= 25


if __name__ == "__main__":
    print(doc_text(), end="")
