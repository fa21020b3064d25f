"""Hydra multirun sweeps as one wandb comparison.

`python train.py -m optimizer=AdamW,RMSprop,SGD loss=dpo` runs each config
into its own run dir under one sweep dir (`hydra.sweep.dir`/`subdir` in
config/config.yaml). `wandb_group_and_tags` puts all of a sweep's runs in one
wandb group (the sweep dir's name, unless `wandb.group` is set) and tags every
run with its optimizer, lr, loss and model, so the wandb UI (or `wandb leet`)
can overlay and filter them. Both are written into the run's saved
config.yaml, so they are visible without wandb too.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

MAX_TAG_LENGTH = 64  # wandb rejects longer tags


def run_tags(cfg: DictConfig) -> list[str]:
    """`optimizer:<name>`, `lr:<lr>`, `loss:<name>`, `model:<name>`."""
    tags = [f"optimizer:{cfg.optimizer.name}", f"lr:{cfg.lr}", f"loss:{cfg.loss.name}", f"model:{cfg.model.name}"]
    return [t[:MAX_TAG_LENGTH] for t in tags]


def wandb_group_and_tags(cfg: DictConfig, hydra_cfg) -> None:
    """Fill `wandb.group` (multirun only, when unset) and add the run tags to
    `wandb.tags` (user tags first, no duplicates). `hydra_cfg` is
    `HydraConfig.get()`."""
    from hydra.types import RunMode

    if cfg.wandb.group is None and hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.wandb.group = Path(hydra_cfg.sweep.dir).name
    tags = list(cfg.wandb.tags or [])
    cfg.wandb.tags = tags + [t for t in run_tags(cfg) if t not in tags]
