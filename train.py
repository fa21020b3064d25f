"""Entry point: compose the config, build the trainer, train.

    python train.py                                    # the embedded default
    python train.py optimizer=RMSprop lr=5e-7 loss=dpo
    python train.py loss=sft max_steps=300 && python train.py loss=dpo model.archive=<that run dir>
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import optimizers
from utils import ConfigError, fail

CONFIG_DIR = Path(__file__).parent / "config"

# Quiet by default: no transformers/tokenizers chatter, no wandb banner.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time

optimizers.register_configs()


def group_options(group: str) -> list[str]:
    names = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
    if group == "optimizer":
        names |= set(optimizers.registry())
    return sorted(names)


def check_group_choices(argv: list[str]) -> None:
    """Catch a misspelled `group=name` before Hydra does, so the user gets one
    line with the valid names instead of Hydra's multi-line report."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or not (CONFIG_DIR / key).is_dir() or "," in value:
            continue
        options = group_options(key)
        if value not in options:
            fail(optimizers.unknown_name_message(key, value, options))


@hydra.main(config_path="config", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from trainers import build_trainer

    run_dir = HydraConfig.get().runtime.output_dir  # the run dir, also inside a multirun sweep
    cfg.run_dir = run_dir
    try:
        trainer = build_trainer(cfg, run_dir)
        trainer.setup()
        trainer.train()
        trainer.cleanup()
    except ConfigError as e:
        fail(str(e))
    print(f"done: {run_dir}")


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
