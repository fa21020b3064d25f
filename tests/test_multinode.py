"""Several nodes, on the loopback interface: each "node" is its own torchrun
invocation (`--nnodes=2`), exactly the command a user types on each machine,
with gloo over 127.0.0.1. Checked against the basic trainer on the same data
and seed: per-step losses (1e-5), exact token counts, an uneven last eval
batch, HSDP (2 nodes x 2 ranks, trainer.replicate=2), resume on 2 nodes
(bit-identical) and with fewer ranks (DCP resharding), and a rank killed with
SIGKILL (every process ends within seconds, one line names the rank)."""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import FAST, MICRO_MODEL, ROOT, read_metrics
from test_fsdp import NOT_REPRODUCIBLE, assert_same_metrics, basic_run

# 17 eval pairs in batches of 8 per rank: with 2 ranks the last global batch
# holds one pair (rank 1 runs a weight-0 copy); 7 greedy generations split 4/3.
RUN = [*FAST, *MICRO_MODEL, "loss=dpo", "eval_every=2", "max_steps=4", "save_every=2", "n_eval_examples=17",
       "n_eval_generations=7", "eval_batch_size=8"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_commands(nnodes: int, per_node: int, *args: str, rdzv: str = "c10d") -> list[list[str]]:
    """The torchrun line each node runs. c10d: the dynamic rendezvous (node
    ranks are assigned as nodes join); static: `--node_rank` and
    `--master_addr/--master_port`, as a SLURM script passes them."""
    port = free_port()
    common = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={per_node}",
              "--max_restarts=0"]
    def where(i):
        if rdzv == "c10d":
            return ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}"]
        return [f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    return [[*common, *where(i), str(ROOT / "train.py"), *args] for i in range(nnodes)]


def start_nodes(commands) -> list[subprocess.Popen]:
    """Node 0 first, the others once its rendezvous port listens: the torchrun
    that binds the endpoint hosts the rendezvous store (on a cluster, the
    endpoint's machine does), so node 0 holds it here, as on a cluster."""
    def start(command):
        # output to files, not pipes: nobody reads a pipe while the test waits, and a full one blocks the writer
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=(err := tempfile.TemporaryFile("w+")), start_new_session=True)
        proc.err = err
        return proc

    first = start(commands[0])
    endpoint = next(a for a in commands[0] if a.startswith(("--rdzv_endpoint=", "--master_port=")))
    port, deadline = int(endpoint.rsplit(":", 1)[-1].split("=")[-1]), time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return [first, *map(start, commands[1:])]


def finish(procs, timeout=300) -> list[tuple[int, str]]:
    """(exit status, stderr) of each node; kills them all if one hangs."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_node(p)
                p.wait()
    for p in procs:
        p.err.seek(0)
    return [(p.returncode, p.err.read()) for p in procs]


def workers(agent: subprocess.Popen) -> list[int]:
    """The pids of the workers torchrun `agent` started (they run in sessions of their own)."""
    found = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def kill_node(agent: subprocess.Popen) -> None:
    """What a node's power cut does: SIGKILL to its torchrun and every worker."""
    for pid in [*workers(agent), agent.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_nodes(nnodes, per_node, *args, rdzv="c10d"):
    results = finish(start_nodes(node_commands(nnodes, per_node, *args, rdzv=rdzv)))
    for code, err in results:
        assert code == 0, err[-4000:]
    return results


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in NOT_REPRODUCIBLE} for row in rows]


def cut_back_to_step_2(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "checkpoints" / "step-4")
    (dest / "checkpoints" / "LATEST").write_text("step-2\n")
    return dest


@pytest.fixture(scope="module")
def basic_rows(tmp_path_factory):
    return basic_run(tmp_path_factory.mktemp("basic"), *RUN)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """2 nodes x 1 rank (c10d rendezvous), 4 steps, checkpoints at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("nodes") / "run"
    run_nodes(2, 1, "trainer=fsdp", *RUN, f"run_dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory):
    """2 nodes x 2 ranks (static rendezvous, --node_rank), trainer.replicate=2."""
    run_dir = tmp_path_factory.mktemp("hsdp") / "run"
    run_nodes(2, 2, "trainer=fsdp", "trainer.replicate=2", *RUN, f"run_dir={run_dir}", rdzv="static")
    return run_dir


def test_two_nodes_match_the_basic_trainer(two_nodes, basic_rows):
    """Losses, rewards, log-probs and grad norms as one process (1e-5); the
    token counts are sums over both nodes' ranks, equal to one process's
    exactly; eval metrics are weighted by the pairs each rank scored (9 and 8
    here), not means of per-rank means."""
    rows = read_metrics(two_nodes)
    assert_same_metrics(rows, basic_rows)
    assert [r["tokens"] for r in rows if "tokens" in r] == [r["tokens"] for r in basic_rows if "tokens" in r]
    evals = [(r["step"], r["generate_eval/accuracy"]) for r in rows if "loss/eval" in r]
    assert evals == [(r["step"], r["generate_eval/accuracy"]) for r in basic_rows if "loss/eval" in r]


def test_two_nodes_resume_bit_identically_on_two_nodes(two_nodes, tmp_path):
    resumed = cut_back_to_step_2(two_nodes, tmp_path / "resumed")
    (_, err), _ = run_nodes(2, 1, "trainer=fsdp", *RUN, f"run_dir={resumed}", "resume=true")
    assert comparable(read_metrics(resumed)) == comparable(read_metrics(two_nodes))


def test_hsdp_two_by_two_matches_the_basic_trainer(hsdp, basic_rows):
    rows = read_metrics(hsdp)
    assert_same_metrics(rows, basic_rows)
    train = [r for r in rows if "loss/train" in r]
    basic = [r for r in basic_rows if "loss/train" in r]
    for h, b in zip(train, basic):
        # each copy of the model is sharded over 2 ranks: about half a model per rank (not a quarter)
        assert 0.49 * b["memory/params_bytes"] <= h["memory/params_bytes_per_rank"] <= 0.52 * b["memory/params_bytes"]
        assert h["tokens"] == b["tokens"]


def test_four_ranks_resumed_on_two_continue_with_the_same_losses(hsdp, tmp_path):
    """The 2x2 HSDP run's step-2 checkpoint, resumed by 2 ranks of plain FSDP
    on one machine: DCP reshards weights and optimizer state; steps 3-4 match
    the uninterrupted 4-rank run (1e-5: another sharding sums in another order)."""
    resumed = cut_back_to_step_2(hsdp, tmp_path / "resumed")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer=fsdp", "trainer.nproc=2", *RUN,
                        f"run_dir={resumed}", "resume=true"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "written by 4 ranks and is resumed on 2" in r.stderr
    assert_same_metrics([row for row in read_metrics(resumed) if row["step"] > 2],
                        [row for row in read_metrics(hsdp) if row["step"] > 2])


def wait_for_checkpoint(run_dir: Path, name: str, procs, timeout=180) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / name).is_dir():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs, 5)
        time.sleep(0.2)


@pytest.mark.parametrize("what", ["rank", "node"])
def test_a_dead_rank_or_node_stops_every_process_in_seconds_and_is_named(tmp_path, what):
    """kill -9 of rank 1's worker (what=rank), or of node 1's torchrun and
    its worker together (what=node), in the middle of a long run: both nodes'
    processes end within 60 s, node 0 prints one error line naming rank 1,
    and resume=true continues from the last checkpoint."""
    run_dir = tmp_path / "run"
    args = ["trainer=fsdp", *RUN, "save_every=5", "eval_every=100000", f"run_dir={run_dir}"]
    procs = start_nodes(node_commands(2, 1, *args, "max_steps=100000"))
    wait_for_checkpoint(run_dir, "step-5", procs)
    worker = next(pid for pid in (rank_pid(p, 1) for p in procs) if pid)
    killed = time.monotonic()
    if what == "rank":
        os.kill(worker, signal.SIGKILL)
    else:
        kill_node(next(p for p in procs if rank_pid(p, 1)))
    results = finish(procs, timeout=60)
    assert time.monotonic() - killed < 60
    survivor_err = next(err for (code, err), p in zip(results, procs) if "rank 1 of 2 died" in err)
    errors = [line for line in re.split(r"[\r\n]", survivor_err) if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1 of 2 died during step" in errors[0], survivor_err[-3000:]
    assert "resume" in errors[0] and "Traceback" not in survivor_err.split("error:")[0][-2000:]
    assert all(code != 0 for code, _ in results)

    resumed_at = int((run_dir / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer.nproc=2", *args,
                        f"max_steps={resumed_at + 2}", "resume=true"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"at step {resumed_at} (2 ranks)" in r.stderr
    assert read_metrics(run_dir)[-1]["step"] == resumed_at + 2


def rank_pid(agent: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker with RANK=`rank` if torchrun `agent` started it."""
    for pid in workers(agent):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None
