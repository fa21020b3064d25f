"""What every script the tests start under torchrun shares (fsdp_optimizer_sweep.py,
fsdp_decay_sweep.py, test_memory_plan_ranks.py, test_fsdp_gpu_paths.py): the
quiet, offline environment of a test run, and the end of a launch (rank 0
writes the results the test reads, then every rank leaves together)."""
import json
import os
from pathlib import Path

QUIET = (("WANDB_SILENT", "true"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"))


def quiet_environment() -> None:
    for key, value in QUIET:
        os.environ.setdefault(key, value)


def finish(out: Path | None = None, results=None) -> None:
    """Rank 0 writes `results` as JSON to `out` (when given); then a barrier
    (no rank tears the group down under another) and the group is destroyed."""
    import torch.distributed as dist

    if out is not None and dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
