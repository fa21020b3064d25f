"""Resuming trainer=fsdp never unpickles arbitrary objects: a crafted
dcp/.metadata or a crafted non-tensor item in a .distcp file is refused in one
line instead of running its code (safe_dcp.py). One tiny 2-rank run (2 AdamW
steps, one checkpoint) serves all the checks on real files."""
import os
import pickle
import shutil

import pytest
import torch
from conftest import FAST, MICRO_MODEL, run_cli

from prefopt.distributed import safe_dcp
from utils import ConfigError

RUN = [*FAST, *MICRO_MODEL, "loss=dpo", "eval_every=2", "optimizer=AdamW", "max_steps=2", "save_every=2"]


class WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appears only if the
    pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dcp") / "run"
    r = run_cli("trainer=fsdp", "trainer.nproc=2", *RUN, f"run_dir={run_dir}")
    assert r.returncode == 0, r.stderr[-4000:]
    return run_dir


def test_safe_reader_reads_genuine_metadata_like_pickle(fsdp_run):
    dcp_dir = fsdp_run / "checkpoints" / "step-2" / "dcp"
    with open(dcp_dir / ".metadata", "rb") as f:
        plain = pickle.load(f)
    safe = safe_dcp.SafeFileSystemReader(dcp_dir).read_metadata()
    plain.storage_meta.load_id = safe.storage_meta.load_id  # a fresh id per reader, as torch's reader sets it
    assert safe == plain
    kinds = {type(v).__name__ for v in safe.state_dict_metadata.values()}
    assert kinds == {"TensorStorageMetadata", "BytesStorageMetadata"}  # shards and param_groups items


def test_code_in_metadata_is_refused_on_resume(fsdp_run, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(fsdp_run, run_dir)
    metadata = run_dir / "checkpoints" / "step-2" / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(WritesMarker(marker)))

    r = run_cli("trainer=fsdp", "trainer.nproc=2", *RUN, "max_steps=4", f"run_dir={run_dir}", "resume=true")
    assert not marker.exists()
    assert r.returncode != 0
    # The check before loading finds it (checkpoints.is_loadable reads the
    # metadata through the safe reader): reported as damaged, the previous
    # checkpoint would be tried, and there is none.
    assert f"warning: checkpoint {metadata.parent.parent} is damaged (RefusedGlobal: io.open" in r.stderr, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("no checkpoint in" in line and "could be loaded" in line for line in errors), r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]

    with open(metadata, "rb") as f:  # the payload is live: plain pickle runs it
        pickle.load(f)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP without a process group says it loads in one process
def test_code_in_a_bytes_item_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    dcp.save({"w": torch.ones(3), "lr": 0.1, "betas": (0.9, 0.99)}, checkpoint_id=tmp_path / "good")
    state = {"w": torch.zeros(3), "lr": 0.0, "betas": None}
    safe_dcp.load(state, tmp_path / "good")  # plain data goes through weights_only=True
    assert state["lr"] == 0.1 and state["betas"] == (0.9, 0.99) and state["w"].tolist() == [1.0, 1.0, 1.0]

    # a non-tensor item is written with torch.save (a pickle) into the .distcp file
    dcp.save({"w": torch.ones(3), "lr": WritesMarker(marker)}, checkpoint_id=tmp_path / "bad")
    with pytest.raises(ConfigError) as e:
        safe_dcp.load({"w": torch.zeros(3), "lr": 0.0}, tmp_path / "bad")
    assert str(e.value) == (f"checkpoint {tmp_path / 'bad'} contains code or objects a checkpoint should not "
                            "(io.open in item lr); it was not loaded")
    assert not marker.exists()

    # the payload is live: torch's own planner runs it
    dcp.load({"w": torch.zeros(3), "lr": 0.0}, checkpoint_id=tmp_path / "bad")
    assert marker.exists()


def test_only_listed_globals_are_built(tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(os.system))  # a bare reference, not even a call
    with pytest.raises(safe_dcp.RefusedGlobal, match="posix.system|nt.system"):
        safe_dcp.read_metadata(path)
