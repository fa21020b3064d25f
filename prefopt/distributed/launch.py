"""Starting the processes of `trainer=fsdp trainer.nproc=<n>`: the same
command under torch.distributed.run (what `torchrun --standalone` does)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from prefopt import rundir
from utils import ConfigError


def requested_nproc(nproc, device: torch.device) -> int:
    """`trainer.nproc`: null/auto = one process per visible GPU (1 on CPU)."""
    if nproc in (None, "auto"):
        return torch.cuda.device_count() if device.type == "cuda" else 1
    if isinstance(nproc, str) and nproc.isdigit():
        nproc = int(nproc)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"trainer.nproc={nproc!r} must be auto or a positive integer")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"trainer.nproc={nproc} but only {torch.cuda.device_count()} GPUs are visible")
    return nproc


def requested_replicas(replicate, world_size: int) -> int:
    """`trainer.replicate` (HSDP copies of the model), checked against the ranks."""
    if isinstance(replicate, str) and replicate.isdigit():
        replicate = int(replicate)
    replicate = 1 if replicate is None else replicate
    if not isinstance(replicate, int) or isinstance(replicate, bool) or replicate < 1:
        raise ConfigError(f"trainer.replicate={replicate!r} must be a positive integer (1 = plain FSDP)")
    if world_size % replicate:
        raise ConfigError(f"trainer.replicate={replicate} does not divide the world size ({world_size} ranks); "
                          "use a divisor of it, usually the number of nodes")
    return replicate


# torch.distributed.run, except that a worker's failure ends it with the
# worker's exit status and no launcher traceback: the worker has already said
# what went wrong in one line.
_LAUNCHER = """import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    code = e.get_first_failure()[1].exitcode
    sys.exit(code if code > 0 else 128 - code)
"""


def relaunch(nproc: int, run_dir: Path) -> None:
    """Start `nproc` copies of this command under torch.distributed.run (what
    `torchrun --standalone --nproc_per_node=<nproc>` does), all with this run's
    run_dir, wait for them and exit with their status."""
    overrides = [o for o in rundir.this_jobs_overrides() if o.lstrip("+~").split("=", 1)[0] != "run_dir"]
    script = os.path.abspath(sys.argv[0])
    if not script.endswith(".py"):
        raise ConfigError(f"trainer.nproc={nproc} starts the processes from train.py; run "
                          f"torchrun --nproc_per_node={nproc} train.py trainer=fsdp ... instead")
    cmd = [sys.executable, "-c", _LAUNCHER, "--standalone", f"--nproc_per_node={nproc}",
           script, *overrides, rundir.run_dir_override(run_dir)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"trainer=fsdp: starting {nproc} processes (torchrun --standalone --nproc_per_node={nproc})",
          file=sys.stderr, flush=True)
    # Its own session: a terminal's Ctrl-C reaches only this process, which
    # passes it on once; the launcher then sends SIGTERM to each worker once
    # (two signals would make a worker exit without its checkpoint).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    raise SystemExit(code)
