"""Shared test helpers: compose the real Hydra config (the same files train.py
uses) with small overrides, and a micro model that trains in milliseconds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))   # bench.py and bench_optim.py are imported by tests/test_speed.py
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from prefopt import optim as optimizers  # noqa: E402

optimizers.register_configs()

# A model small enough that every optimizer can take a few steps in well under a second.
MICRO_MODEL = [
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
]
FAST = ["wandb.mode=disabled", "dataset.n_train=256", "dataset.n_eval=32", "n_eval_examples=32",
        "n_eval_generations=8", "batch_size=8", "eval_batch_size=16", "log_every=1",
        "reference_cache_dir=null"]   # tests that use the reference cache give it a tmp dir


def compose(*overrides: str):
    """The config train.py would compose for these overrides (config_checks.compose)."""
    from prefopt.config_checks import compose as compose_config

    return compose_config(list(overrides))


def make_trainer(tmp_path, *overrides: str, setup: bool = True):
    from trainers import build_trainer

    cfg = compose(*FAST, *MICRO_MODEL, f"run_dir={tmp_path}", *overrides)
    trainer = build_trainer(cfg, tmp_path)
    if setup:
        trainer.setup()
    return trainer


def run_cli(*args: str, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    """Run `python train.py ...` exactly as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir):
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def micro_trainer(tmp_path):
    return lambda *overrides, setup=True: make_trainer(tmp_path, *overrides, setup=setup)
