"""Loading torch.distributed.checkpoint (DCP) shards without running code from
the checkpoint.

torch's FileSystemReader reads `dcp/.metadata` with plain `pickle.load`, and
its DefaultLoadPlanner reads every non-tensor item (the optimizer's
param_groups: lr, betas, parameter names...) with
`torch.load(weights_only=False)`. Either would run whatever a crafted file
asks for on `resume=true`. Here the metadata goes through an unpickler that
can build only the few classes DCP itself writes there, and non-tensor items
through `torch.load(weights_only=True)` (plain data and tensors). Tensors
were already loaded with weights_only=True by torch.

`load(state, checkpoint_dir)` replaces `dcp.load(state, checkpoint_id=...)`;
a refused checkpoint becomes a one-line ConfigError on every rank.
"""
from __future__ import annotations

import pathlib
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo

from utils import ConfigError

# Layouts are pickled as a call of torch.serialization._get_layout("torch.strided");
# our stand-in only looks the name up.
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _layout(name: str) -> torch.layout:
    if name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return _LAYOUTS[name]


# Every global a DCP .metadata needs, found by recording the find_class calls
# while unpickling real trainer=fsdp checkpoints (AdamW and adam_mini, torch
# 2.13) and checked against torch/distributed/checkpoint/metadata.py and
# filesystem.py. Each is a dataclass, an enum, torch.Size, a path or a
# constant: building them runs no code beyond storing their fields. Lists,
# dicts, tuples, strings, numbers and None need no global at all.
ALLOWED = {
    ("torch.distributed.checkpoint.metadata", cls.__name__): cls
    for cls in (md.Metadata, md.TensorStorageMetadata, md.BytesStorageMetadata, md.ChunkStorageMetadata,
                md.TensorProperties, md.MetadataIndex, md.StorageMeta, md._MEM_FORMAT_ENCODING)
}
ALLOWED.update({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,  # where each item lies in a .distcp
    ("torch", "Size"): torch.Size,                        # tensor sizes, chunk offsets
    ("torch.serialization", "_get_layout"): _layout,      # TensorProperties.layout
    ("pathlib", "PosixPath"): pathlib.PosixPath,          # StorageMeta.checkpoint_id (the save directory)
    ("pathlib._local", "PosixPath"): pathlib.PosixPath,   # the same, as Python >= 3.13 names it
})
# dtypes (and, for older torch versions, layouts and memory formats) are
# pickled by name as attributes of the torch module: constants, not callables.
ALLOWED.update({("torch", name): v for name, v in vars(torch).items()
                if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))})


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that a checkpoint has no business holding.
    args: (the global as module.name, where it was found or None); plain
    args so that DCP can pass it between ranks."""

    def __init__(self, name: str, where: str | None = None):
        super().__init__(name, where)
        self.name, self.where = name, where

    def __str__(self) -> str:
        return self.name + (f" in {self.where}" if self.where else "")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Never imports anything: only objects already in ALLOWED are handed out.
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def read_metadata(path: Path) -> md.Metadata:
    """A DCP .metadata file, unpickled with only ALLOWED globals."""
    with open(path, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, md.Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose read_metadata uses the restricted unpickler; the
    rest (what it does with the result) is torch's."""

    def read_metadata(self, *args, **kwargs) -> md.Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _refused_global(error: Exception) -> str:
    """The global torch's weights_only unpickler refused, from its message."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return found.group(1) if found else str(error).strip().splitlines()[0]


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items load with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise RefusedGlobal(_refused_global(e), f"item {fqn}") from None
        # where DefaultLoadPlanner.load_bytes puts it
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _refusal(checkpoint, refused: RefusedGlobal) -> ConfigError:
    return ConfigError(f"checkpoint {checkpoint} contains code or objects a checkpoint should not ({refused}); "
                       "it was not loaded")


def load(state: dict, checkpoint_dir: Path) -> None:
    """dcp.load(state, checkpoint_id=checkpoint_dir), refusing to run code.

    Every rank checks the metadata first, so a refused or unreadable file
    stops all ranks with the same one-line error before any collective (torch
    would log a traceback and retry with per-rank metadata). A refused item
    inside a .distcp reaches every rank as a CheckpointException."""
    import torch.distributed.checkpoint as dcp

    checkpoint_dir = Path(checkpoint_dir)
    metadata_file = checkpoint_dir / ".metadata"
    try:
        read_metadata(metadata_file)
    except RefusedGlobal as e:
        raise _refusal(metadata_file, e) from None
    except Exception as e:  # missing, truncated, not a pickle, ...
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"checkpoint {metadata_file} is damaged ({type(e).__name__}: {first_line}); "
                          "it was not loaded") from None
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(checkpoint_dir), planner=SafeLoadPlanner())
    except CheckpointException as e:
        for error, _ in e.failures.values():
            if isinstance(error, RefusedGlobal):
                raise _refusal(checkpoint_dir, error) from None
        raise
