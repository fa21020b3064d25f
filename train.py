"""Entry point: compose the config, build the trainer, train.

    python train.py                                    # the embedded default
    python train.py optimizer=RMSprop lr=5e-7 loss=dpo
    python train.py loss=sft max_steps=300 && python train.py loss=dpo model.archive=<that run dir>
"""
from __future__ import annotations

import os
import signal
import sys


def _interrupted_during_setup(signum, frame):
    # Ctrl-C outside the training loop (imports, config, model and data
    # loading, shutdown): one line, not a traceback. The training loop installs
    # its own handler, which finishes the step and saves a checkpoint first.
    print("\nerror: interrupted (Ctrl-C) outside the training loop (setup or shutdown); nothing more was saved",
          file=sys.stderr)
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_during_setup)

# The imports below come after the handler: importing torch takes seconds.
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from prefopt import config_checks, losses, rundir, sweeps
from prefopt import optim as optimizers
from utils import ConfigError, fail

# Quiet by default: no transformers/tokenizers chatter, no wandb banner.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time

# Config nodes only for the optimizers named on the command line (and those
# with YAMLs): a run imports no optional optimizer package it does not use.
optimizers.register_configs(config_checks.chosen(sys.argv[1:], "optimizer"))
losses.register_configs()


@hydra.main(config_path="config", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from trainers import build_trainer

    run_dir = HydraConfig.get().runtime.output_dir  # the run dir, also inside a multirun sweep
    cfg.run_dir = run_dir
    sweeps.wandb_group_and_tags(cfg, HydraConfig.get())  # one wandb group per multirun sweep
    try:
        config_checks.validate(cfg)
        if cfg.plan_only:
            from prefopt import memory

            memory.run(cfg, run_dir)
            return
        rundir.claim_run_dir(cfg)   # refuse someone else's folder or a second run; lock; resume checks
        trainer = build_trainer(cfg, run_dir)
        trainer.setup()
        trainer.train()
        trainer.cleanup()
    except ConfigError as e:
        fail(str(e), e.exit_code)
    print(f"done: {run_dir}")


if __name__ == "__main__":
    try:
        config_checks.check_command_line(sys.argv[1:])
    except ConfigError as e:
        fail(str(e))
    main()
