"""Every bad input gets a one-line error: exit status != 0, at most a couple
of lines on stderr, no traceback, and the message below. Each case runs
`python train.py ...` as a real subprocess in a scratch folder.

`python tests/test_bad_inputs.py` prints the table of docs/bad_inputs.md from
the messages the current code gives; a test checks that the doc is current.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad_inputs.md"
QUIET = ["wandb.mode=disabled"]
# Small, fast settings for the cases that get as far as building a model.
SMALL = QUIET + ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
                 "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2", "max_steps=3",
                 "batch_size=4", "n_eval_examples=8", "n_eval_generations=0"]
ROW = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def data(*rows):
    """A jsonl dataset: the given rows after enough good ones to split."""
    return jsonl(*[ROW] * 12, *rows)


# (id, files to create {name: text or bytes}, command-line args, expected text in the message, exit status)
CASES = [
    ("unknown optimizer", {}, ["optimizer=Adamw"], "unknown optimizer 'Adamw' (did you mean AdamW?)", 2),
    ("unknown loss", {}, ["loss=dop"], "unknown loss 'dop' (did you mean dpo?)", 2),
    ("unknown model", {}, ["model=tiny2"], "unknown model 'tiny2' (did you mean tiny?)", 2),
    ("unknown dataset", {}, ["dataset=hhh"], "unknown dataset 'hhh' (did you mean hh?)", 2),
    ("unknown optimizer in a sweep", {}, ["-m", "optimizer=AdamW,RMSprob"], "unknown optimizer 'RMSprob'", 2),
    ("unknown top-level key", {}, ["max_step=10"], "unknown config key 'max_step'", 2),
    ("unknown key added with +", {}, ["+foo=1"], "unknown config key 'foo'", 2),
    ("unknown optimizer keyword", {}, ["optimizer=SGD", "optimizer.momentun=0.9"],
     "unknown config key 'optimizer.momentun'", 2),
    ("override without a value", {}, ["lr"], "could not read the command line", 2),
    ("unbalanced brackets", {}, ["optimizer.betas=[0.9,0.95"], "could not read the command line", 2),
    ("wrong type: int", {}, ["max_steps=ten"], "max_steps='ten' should be an integer (default: 100)", 2),
    ("wrong type: float", {}, ["loss.beta=high"], "loss.beta='high' should be a number (default: 0.1)", 2),
    ("wrong type: bool", {}, ["resume=maybe"], "resume='maybe' should be true/false (default: False)", 2),
    ("zero steps", {}, ["max_steps=0"], "max_steps=0 must be >= 1", 2),
    ("negative lr", {}, ["lr=-0.1"], "lr=-0.1 must be >= 0", 2),
    ("batch not divisible", {}, ["batch_size=30", "gradient_accumulation_steps=4"],
     "batch_size=30 must be divisible by gradient_accumulation_steps=4 x world size 1", 2),
    ("prompt limit >= max_length", {}, ["max_prompt_length=64"], "max_prompt_length=64 must be smaller than max_length=48", 2),
    ("unknown scheduler", {}, ["scheduler=cosin"], "scheduler=cosin is not one of constant, linear, cosine", 2),
    ("unknown wandb mode", {}, ["wandb.mode=offlne"], "wandb.mode=offlne is not one of offline, online, disabled", 2),
    ("warmup longer than run", {}, ["scheduler=cosine", "warmup_steps=100"], "warmup_steps=100 leaves no steps", 2),
    ("optimizer needing sparse grads", {}, ["optimizer=SparseAdam"], "SparseAdam only accepts sparse gradients", 2),
    ("optimizer needing a closure", {}, ["optimizer=LBFGS"], "LBFGS needs a closure", 2),
    ("bad optimizer value", {}, [*SMALL, "optimizer.betas=[1.5,0.999]"],
     "optimizer=AdamW rejected its settings: Invalid beta parameter at index 0: 1.5", 2),
    ("bf16 on CPU", {}, [*SMALL, "precision=bf16", "device=cpu"], "precision=bf16 on CPU is far slower than fp32", 2),
    ("CUDA without a GPU", {}, [*SMALL, "device=cuda"], "device=cuda was requested but no CUDA GPU is visible", 2),
    ("HSDP copies that do not divide the ranks", {}, [*SMALL, "trainer=fsdp", "trainer.nproc=2", "trainer.replicate=3"],
     "trainer.replicate=3 does not divide the world size (2 ranks)", 2),
    ("missing archive", {}, ["model.archive=no_such_run"], "model.archive=no_such_run is not a Hugging Face checkpoint", 2),
    ("unreadable checkpoint", {"ckpt/config.json": '{"model_type": "llama"}', "ckpt/model.safetensors": b"garbage"},
     [*SMALL, "model.archive=ckpt"], "model.archive=ckpt could not be loaded", 2),
    ("run dir not writable", {"afile": "x"}, ["run_dir=afile/run"], "run_dir=afile/run cannot be written", 2),
    ("resume with nothing to resume", {}, ["resume=true", "run_dir=fresh"], "resume=true but fresh/checkpoints has no checkpoint", 2),
    ("dataset path missing", {}, [*SMALL, "dataset=jsonl"], "dataset=jsonl needs dataset.path", 2),
    ("dataset file missing", {}, [*SMALL, "dataset=jsonl", "dataset.path=nope.jsonl"], "dataset.path=nope.jsonl does not exist", 2),
    ("empty dataset", {"empty.jsonl": ""}, [*SMALL, "dataset=jsonl", "dataset.path=empty.jsonl"], "has 0 usable rows", 2),
    ("row missing a field", {"d.jsonl": data({"prompt": "1+1=", "chosen": "2"})},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl"], 'd.jsonl: row 13: missing field "rejected"', 2),
    ("row with an empty field", {"d.jsonl": data({"prompt": "1+1=", "chosen": "", "rejected": "3"})},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl"], "d.jsonl: row 13", 2),
    ("row with a wrong type", {"d.jsonl": data({"prompt": "1+1=", "chosen": 2, "rejected": "3"})},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl"], "d.jsonl: row 13", 2),
    ("row that is not JSON", {"d.jsonl": data() + "{not json}\n"},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl"], "d.jsonl: row 13: invalid JSON", 2),
    ("non-UTF-8 bytes", {"d.jsonl": data().encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl"], "d.jsonl: row 13: not valid UTF-8", 2),
    ("DPO on data without rejected", {"d.jsonl": jsonl(*[{"prompt": "a", "chosen": "b"}] * 12)},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl"], 'missing field "rejected"', 2),
    ("non-finite loss", {}, [*SMALL, "optimizer=SGD", "lr=1e12", "max_steps=20"],
     "non-finite loss or gradient norm", 3),
    ("unknown nonfinite policy", {}, ["nonfinite=explode"], "nonfinite=explode is not one of stop, skip", 2),
    ("every pair with chosen == rejected",
     {"d.jsonl": jsonl(*[{"prompt": f"{i}+{i}=", "chosen": "4", "rejected": "4"} for i in range(12)])},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl", "dataset.n_eval=4"], "all 8 train pairs have chosen == rejected", 2),
    ("lone UTF-16 surrogate (JSON escape)", {"d.jsonl": data({"prompt": "caf\ud800", "chosen": "a", "rejected": "b"})},
     [*SMALL, "dataset=jsonl", "dataset.path=d.jsonl"], 'd.jsonl: row 13: field "prompt" holds a lone UTF-16 surrogate', 2),
    ("list of the wrong length", {}, ["optimizer.betas=[0.9]"],
     "optimizer.betas=[0.9] should be a list of 2 numbers (default: [0.9, 0.999])", 2),
    ("wrong type: optimizer keyword", {}, ["optimizer=SGD", "optimizer.momentum=high"],
     "optimizer.momentum='high' should be a number (default: 0.0)", 2),
    ("sweep values without -m", {}, ["lr=1e-3,1e-2"], "lr=1e-3,1e-2 has several values: add -m", 2),
    ("wrong type in one sweep job", {}, ["-m", "max_steps=2,ten"],
     "multirun job #1 of 2 (max_steps=ten): max_steps='ten' should be an integer (default: 100)", 2),
    ("bad value in one sweep job", {}, ["-m", "lr=1e-3,-0.1"], "multirun job #1 of 2 (lr=-0.1): lr=-0.1 must be >= 0", 2),
    ("bad value of a Hydra flag", {}, ["--cfg", "jobb"], "argument --cfg/-c: invalid choice: 'jobb'", 2),
    ("Hydra flags that do not go together", {}, ["--resolve"], "--resolve works only together with --cfg or --help", 2),
    ("unknown key after a Hydra flag", {}, ["--cfg", "job", "max_step=1"], "unknown config key 'max_step'", 2),
]


def run_case(case, workdir: Path):
    _, files, args, _, _ = case
    workdir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def documented(line: str) -> str:
    """The message as the doc shows it: a list of every valid name (it grows
    with each installed optimizer package) is cut short."""
    head, sep, _ = line.partition("; valid names: ")
    return head + (sep + "..." if sep else "")


def error_line(stderr: str) -> str:
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.startswith("error: ")]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All cases at once, a few processes in parallel (most of each is Python start-up)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c[0]: pool.submit(run_case, c, root / str(i)) for i, c in enumerate(CASES)}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(results, case):
    name, _, args, expected, status = case
    r = results[name]
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = error_line(r.stderr)
    assert expected in line, r.stderr[-3000:]
    # stderr holds the error and, at most, progress-bar residue: no multi-line reports
    assert len([l for l in r.stderr.replace("\r", "\n").splitlines() if l.strip() and not l.startswith(("train:", "eval @"))]) <= 2
    assert documented(line) in DOC.read_text(), f"docs/bad_inputs.md is out of date for {name!r}: regenerate it"


def test_skip_bad_rows_counts_and_goes_on(tmp_path):
    case = ("skip", {"d.jsonl": data({"prompt": "1+1=", "chosen": "2"}) + "{not json}\n"},
            [*SMALL, "loss=sft", "dataset=jsonl", "dataset.path=d.jsonl", "dataset.n_eval=2", "data.skip_bad_rows=true"], "", 0)
    r = run_case(case, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 2 malformed rows (data.skip_bad_rows=true)" in r.stderr


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


if __name__ == "__main__":  # regenerate the table for docs/bad_inputs.md
    import tempfile

    root = Path(tempfile.mkdtemp())
    with ThreadPoolExecutor(max_workers=3) as pool:
        outs = list(pool.map(lambda ic: run_case(ic[1], root / str(ic[0])), enumerate(CASES)))
    print("| # | bad input | command line | exit | message |\n|---|---|---|---|---|")
    for i, (case, r) in enumerate(zip(CASES, outs), 1):
        shown = " ".join(a for a in case[2] if a not in SMALL)
        files = ", ".join(case[1])
        print(f"| {i} | {case[0]}{' (files: ' + files + ')' if files else ''} | `train.py {shown}` | {r.returncode} "
              f"| `{documented(error_line(r.stderr))}` |")
