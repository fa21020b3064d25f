"""Run under torchrun by tests/test_fsdp.py (not a test module itself):

    torchrun --nproc_per_node=2 tests/fsdp_optimizer_sweep.py <out.json> '<overrides as JSON>' <optimizer> ...

For each optimizer, two optimizer steps with trainer=fsdp (the models sharded
over the ranks) and with trainer=basic (whole, in rank 0's process, on the
same data and seed), then an evaluation; rank 0 writes both evaluations per name.
One process group serves every trainer, so the launch is paid once; only the
named optimizers' config nodes are registered (conftest registers all, which
imports every optional optimizer package)."""
import json
import sys
from collections import defaultdict
from pathlib import Path

import launched
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SETTINGS = ["n_eval_generations=0", "max_steps=2"]
COMMON: list[str] = []  # from the command line


def make_trainer(run_dir: Path, *overrides: str):
    from prefopt.config_checks import compose
    from trainers import build_trainer

    cfg = compose([*COMMON, f"run_dir={run_dir}", *overrides])
    trainer = build_trainer(cfg, run_dir)
    trainer.setup()
    return trainer


def evaluate_after_two_steps(run_dir: Path, *overrides: str) -> dict:
    trainer = make_trainer(run_dir, *SETTINGS, *overrides)
    window = defaultdict(list)
    for _ in range(2):
        trainer.train_step(window)
    metrics = trainer.evaluate()
    trainer.cleanup()
    return metrics


def main() -> None:
    global COMMON
    out, COMMON, names = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
    from prefopt import optim as optimizers

    optimizers.register_configs(names)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in names:
        base = out.parent / f"sweep-{name}"
        fsdp = evaluate_after_two_steps(base / "fsdp", "trainer=fsdp", f"optimizer={name}")
        if rank == 0:
            results[name] = {"fsdp": fsdp, "basic": evaluate_after_two_steps(base / "basic", f"optimizer={name}")}
    launched.finish(out, results)


if __name__ == "__main__":
    launched.quiet_environment()
    main()
