"""Every command printed in README.md and docs/*.md runs here, as a reader
would run it: the ```bash blocks of one file, in order, through one bash
process (so `SM="..."` set on one line is seen by the next, and `run_dir=runs/sft`
followed by `model.archive=runs/sft` chains), in a fresh copy of the repository.
Each command must exit 0; the few that cannot run here are listed below with
the reason, and each listed one must still be printed in the docs.

Commands are made short, not changed: `python` (and `.venv/bin/python`) is a
wrapper that runs this file, whose `shorten()` puts small settings (max_steps=2,
a small eval, ...) on `train.py` / `bench.py` / `bench_optim.py` command lines,
in place of any value given for the same key, and leaves the rest (run_dir,
hydra.sweep.dir, optimizer lists, ...) as written.

    python tests/test_docs_commands.py train.py loss=sft     # what a command becomes, then runs it
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_FENCES = {"bash", "sh", "shell"}  # ```text and bare ``` blocks are sample output, not commands

pytestmark = pytest.mark.slow  # ~40 real runs, six of them load SmolLM2-135M: 10-20 min on 2 cores

# A distinctive part of each command that is not run, and why. Each must match
# exactly one printed command (test_exceptions_are_still_printed).
NOT_RUN = {
    ".venv/bin/python -m pytest -q tests":
        "the README's test command is what .ci/run runs: it creates the venv, installs from PyPI (network) "
        "and runs the whole suite, this test included",
    "pip install torch==2.13.0 -r requirements-bench.txt":
        "installs TRL from PyPI: needs the network",
    "python benchmarks/bench.py --vs-trl loss.precompute_reference=true [compile=true --warmup 5]":
        "the [...] marks optional arguments",
    "python benchmarks/bench.py --vs-trl compile=true --warmup 5":
        "torch.compile of both trainers' models (inductor builds C++ for minutes on 2 cores); the --vs-trl path "
        "itself runs in the command before it",
    "torchrun --nproc_per_node=8 train.py trainer=fsdp ...":
        "8 GPUs, and `...` stands for more overrides; the CPU form (trainer.nproc=2) is the next command",
    "--rdzv_endpoint=node0:29400":
        "two machines with 8 GPUs each; the same line over the loopback interface is the next command",
    "srun --nodes=2":
        "a SLURM cluster; the same static-rendezvous torchrun lines run on the loopback interface after it",
    "python train.py trainer=fsdp model=tinyllama-1b":
        "the GPU benchmark loop: TinyLlama-1.1B at max_length=1024 on 8 GPUs, as the text says",
}
# Commands of which only a part runs here.
RUN_INSTEAD = {
    "python study.py smollm2":
        ("python study.py smollm2 --dry-run", "8 trainings of SmolLM2-135M (minutes each on 2 cores)"),
    "python study.py tiny":
        ("python study.py tiny --dry-run", "the whole study is 70 trainings (13 min on 2 cores); tests/test_study.py "
         "runs a real small study twice"),
    "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/python train.py":
        (".venv/bin/python train.py", "creating the venv and installing from PyPI need the network; the venv exists"),
}

# What "short" means. Settings given in a command for these keys are replaced.
TRAIN_SHORT = {"max_steps": "2", "log_every": "1", "eval_every": "2", "n_eval_examples": "8",
               "n_eval_generations": "4", "eval_batch_size": "8", "batch_size": "8", "dataset.n_train": "64",
               "wandb.mode": "disabled"}
# SmolLM2-135M takes ~15 s to load and ~20 s a step of 8 pairs on 2 cores.
SMOL_SHORT = {**TRAIN_SHORT, "max_steps": "1", "eval_every": "1", "batch_size": "2", "eval_batch_size": "2",
              "n_eval_examples": "2", "n_eval_generations": "1"}
# Other scripts: their own flags, appended (argparse keeps the last value given).
SCRIPT_FLAGS = {
    "bench.py": ["--steps", "1", "--warmup", "1", "--rounds", "1", "--max-wait", "0", "--peak-size", "512"],
    "bench_optim.py": ["--model", "llama-1m", "--steps", "2", "--warmup", "1"],
}
# bench.py's Hydra overrides: its default 512 training pairs would all get reference
# log-probs precomputed (minutes with loss.precompute_reference=true model=llama-25m).
BENCH_OVERRIDES = ["dataset.n_train=16"]
BENCH_SWITCHES = {"--vs-trl", "--trl-keep-cpu-memory"}  # bench.py's flags that take no value


def shorten(args: list[str]) -> list[str]:
    """The arguments after `python`, made short; anything but our scripts passes unchanged."""
    if not args:
        return args
    script = Path(args[0]).name
    if script == "train.py":
        short = SMOL_SHORT if "model=smollm2-135m" in args else TRAIN_SHORT
        kept = [a for a in args[1:] if a.split("=", 1)[0].lstrip("+~") not in short]
        return [args[0], *kept, *(f"{k}={v}" for k, v in short.items())]
    if script == "bench.py":
        # Its overrides are one run of positional arguments (argparse refuses a second
        # run after a flag), so ours go right after the last positional one given.
        last = 0
        for i in range(1, len(args)):
            after_flag = args[i - 1].startswith("--") and "=" not in args[i - 1] and args[i - 1] not in BENCH_SWITCHES
            if not args[i].startswith("-") and not after_flag:
                last = i
        args = [*args[:last + 1], *BENCH_OVERRIDES, *args[last + 1:]]
    return [*args, *SCRIPT_FLAGS.get(script, [])]


# --------------------------------------------------------------------------
# Reading the commands out of the docs


def strip_comment(line: str) -> str:
    """`cmd   # comment` -> `cmd`: a # that starts a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_parses(text: str) -> bool:
    return subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True).returncode == 0


def commands(doc: Path) -> list[str]:
    """The commands of the doc's ```bash blocks, in order: `\\` continuations
    joined, comments dropped, lines grouped until bash can parse them (a `for`
    loop is one command)."""
    out, block, pending = [], None, ""
    for lineno, raw in enumerate(doc.read_text().splitlines(), 1):
        fence = re.match(r"^(\s*)```\s*(\S*)\s*$", raw)
        if fence and block is None:
            block = {"indent": len(fence.group(1)), "lang": fence.group(2), "lines": []}
            continue
        if fence and block is not None:
            if block["lang"] in COMMAND_FENCES:
                text = "\n".join(block["lines"])
                text = re.sub(r"\s*\\\n\s*", " ", text)  # join continuations
                for line in text.splitlines():
                    line = strip_comment(line)
                    if not line:
                        continue
                    pending = f"{pending}\n{line}" if pending else line
                    if bash_parses(pending):
                        out.append(pending)
                        pending = ""
                assert not pending, f"{doc.name}:{lineno}: unfinished command at the end of a block: {pending!r}"
            block = None
            continue
        if block is not None:
            block["lines"].append(raw[block["indent"]:] if raw[:block["indent"]].isspace() else raw.lstrip())
    return out


def match_exception(table: dict, command: str):
    hits = [key for key in table if key in command]
    assert len(hits) <= 1, f"{command!r} matches several exceptions: {hits}"
    return hits[0] if hits else None


# --------------------------------------------------------------------------
# A fresh copy of the repository, with `python` made short


def fresh_copy(dest: Path) -> Path:
    """The files git knows (tracked, plus new files not ignored), as in a checkout
    of the working tree; .venv -> the venv running this test, with `python` the
    shortening wrapper."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    real_venv = Path(sys.prefix)
    venv = dest / ".venv"
    (venv / "bin").mkdir(parents=True)
    for entry in real_venv.iterdir():
        if entry.name != "bin":
            (venv / entry.name).symlink_to(entry)
    for entry in (real_venv / "bin").iterdir():
        (venv / "bin" / entry.name).symlink_to(entry)
    for name in ("python", "python3"):
        wrapper = venv / "bin" / name
        wrapper.unlink(missing_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
        wrapper.chmod(0o755)
    return dest


def run_doc(doc: Path, tmp_path: Path):
    """Run every command of `doc` in order in one bash process, in a fresh copy.
    Returns [(command as written, what ran, exit status, seconds, log tail)]."""
    cmds = commands(doc)
    repo = fresh_copy(tmp_path / "repo")
    logs = tmp_path / "logs"
    logs.mkdir()
    plan, script = [], ["cd " + _q(repo)]
    for cmd in cmds:
        if match_exception(NOT_RUN, cmd):
            continue
        instead = match_exception(RUN_INSTEAD, cmd)
        ran = RUN_INSTEAD[instead][0] if instead else cmd
        i = len(plan)
        plan.append((cmd, ran))
        # Braces, not a subshell: a variable set by one command is seen by the next.
        script += ["__start=$EPOCHREALTIME", "{", ran, f"}} >{_q(logs / f'{i}.log')} 2>&1 </dev/null",
                   f'echo "{i} $? $__start $EPOCHREALTIME" >>{_q(logs / "status")}']
    env = {**os.environ, "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "VIRTUAL_ENV": str(repo / ".venv"), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, env=env, timeout=3600)
    status = {}
    if (logs / "status").exists():
        for line in (logs / "status").read_text().splitlines():
            i, rc, start, end = line.split()
            status[int(i)] = (int(rc), float(end.replace(",", ".")) - float(start.replace(",", ".")))
    results = []
    for i, (cmd, ran) in enumerate(plan):
        rc, seconds = status.get(i, (None, 0.0))
        log = logs / f"{i}.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        results.append((cmd, ran, rc, seconds, tail))
    return results


def _q(path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_printed_command_runs(doc, tmp_path):
    results = run_doc(doc, tmp_path) if commands(doc) else []
    table = "\n".join(f"{seconds:7.1f} s  rc={rc}  {cmd.splitlines()[0][:110]}"
                      for cmd, _, rc, seconds, _ in results)
    total = sum(r[3] for r in results)
    print(f"\n{doc.name}: {len(results)} commands, {total:.0f} s\n{table}")
    failed = [f"$ {cmd}\n  (ran: {shorten_preview(ran)})\n  exit status {rc}\n{tail}"
              for cmd, ran, rc, _, tail in results if rc != 0]
    assert not failed, (f"{len(failed)} command(s) of {doc.name} failed (the copy and full logs are in {tmp_path}):"
                        "\n\n" + "\n\n".join(failed))
    shutil.rmtree(tmp_path / "repo", ignore_errors=True)  # ~8 GB of SmolLM2 checkpoints; pytest keeps 3 sessions


def shorten_preview(command: str) -> str:
    """The command line with the `python` arguments as shorten() makes them (for failure messages)."""
    words = command.split()
    for j, word in enumerate(words):
        if word in ("python", ".venv/bin/python") and j + 1 < len(words):
            return " ".join(words[:j + 1] + shorten(words[j + 1:]))
    return command


def test_exceptions_are_still_printed():
    printed = [cmd for doc in DOC_FILES for cmd in commands(doc)]
    for key in [*NOT_RUN, *RUN_INSTEAD]:
        hits = [cmd for cmd in printed if key in cmd]
        assert len(hits) == 1, f"the exception {key!r} matches {len(hits)} printed commands, not 1: update the list"


def test_shorten():
    assert shorten(["train.py", "loss=sft", "max_steps=200", "run_dir=runs/sft"]) == [
        "train.py", "loss=sft", "run_dir=runs/sft", *(f"{k}={v}" for k, v in TRAIN_SHORT.items())]
    assert "max_steps=1" in shorten(["train.py", "-m", "model=smollm2-135m", "max_steps=20"])
    assert shorten(["compare.py", "runs/x", "--json"]) == ["compare.py", "runs/x", "--json"]
    flags = SCRIPT_FLAGS["bench.py"]
    assert shorten(["bench.py", "--size", "25m", "compile=true"]) == ["bench.py", "--size", "25m", "compile=true",
                                                                      *BENCH_OVERRIDES, *flags]
    assert shorten(["bench.py", "model=m", "--steps", "5"]) == ["bench.py", "model=m", *BENCH_OVERRIDES, "--steps", "5",
                                                                *flags]
    assert shorten(["bench.py", "--variant", "a=b", "--rounds", "4"]) == ["bench.py", *BENCH_OVERRIDES, "--variant",
                                                                         "a=b", "--rounds", "4", *flags]
    assert shorten(["-c", "print(1)"]) == ["-c", "print(1)"]


if __name__ == "__main__":  # the `python` of the copied repository: run the command, made short
    os.execv(sys.executable, [sys.executable, *shorten(sys.argv[1:])])
