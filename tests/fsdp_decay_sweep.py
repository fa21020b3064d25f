"""Run under torchrun by tests/test_fsdp.py (not a test module itself):

    torchrun --nproc_per_node=2 tests/fsdp_decay_sweep.py <out dir> '<overrides as JSON>' <steps> \
        '{"<optimizer>": [<its own overrides>], ...}'

For each optimizer, `steps` optimizer steps with optimizer.weight_decay=0.1
and its own overrides: trainer=fsdp on both ranks, then trainer=basic on rank
0 while rank 1 runs trainer=basic without weight decay (the size of decay's effect, so the test
can check that its tolerance would see decay go missing). Rank 0 writes
<out dir>/<optimizer>.pt: the FSDP run's full weights, optimizer state
(gathered from the shards) and evaluation, the same for the basic run, the
starting weights and the no-decay weights. Same launcher and trainer
construction as fsdp_optimizer_sweep.py."""
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_optimizer_sweep as sweep  # noqa: E402  (puts the repository root on sys.path)
import launched  # noqa: E402

WEIGHT_DECAY = 0.1


def full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(trainer) -> tuple[dict, dict]:
    """Whole weights and optimizer state by parameter name; under FSDP every
    rank takes part in the gathers, in the same order."""
    weights, state = {}, {}
    for name, p in trainer.policy.named_parameters():
        weights[name] = full(p)
        s = trainer.optimizer.state.get(p, {})
        state[name] = {k: full(v) if torch.is_tensor(v) else v for k, v in sorted(s.items())}
    return weights, state


def train(run_dir: Path, steps: int, *overrides: str) -> dict:
    trainer = sweep.make_trainer(run_dir, "n_eval_generations=0", f"max_steps={steps}", *overrides)
    init = {n: full(p) for n, p in trainer.policy.named_parameters()}
    window = defaultdict(list)
    for _ in range(steps):
        trainer.train_step(window)
    weights, state = snapshot(trainer)
    metrics = trainer.evaluate()
    trainer.cleanup()
    return {"init": init, "weights": weights, "state": state, "eval": metrics}


def main() -> None:
    out, steps, sweeps = Path(sys.argv[1]), int(sys.argv[3]), json.loads(sys.argv[4])
    sweep.COMMON, names = json.loads(sys.argv[2]), list(sweeps)
    from prefopt import optim as optimizers

    optimizers.register_configs(names)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    decay = f"optimizer.weight_decay={WEIGHT_DECAY}"
    for name in names:
        base = out / f"decay-{name}"
        own = [f"optimizer={name}", *sweeps[name]]
        fsdp = train(base / "fsdp", steps, "trainer=fsdp", *own, decay)
        if rank == 0:
            basic = train(base / "basic", steps, *own, decay)
        else:
            no_decay = train(base / "no_decay", steps, *own, "optimizer.weight_decay=0.0")["weights"]
        box = [None if rank == 0 else no_decay]
        dist.broadcast_object_list(box, src=1)
        if rank == 0:
            torch.save({"fsdp": fsdp, "basic": basic, "no_decay": box[0], "steps": steps}, out / f"{name}.pt")
    launched.finish()


if __name__ == "__main__":
    launched.quiet_environment()
    main()
