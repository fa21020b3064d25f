"""Where rows come from (config/dataset/*.yaml): `dataset.path`, a local
.jsonl, .json or .parquet file, with `dataset.eval_path` for the eval split or
else the last `n_eval` rows of `path` held out; if `path` is null, the hub
dataset `dataset.hub` (its `hub_train_split` / `hub_eval_split`). `n_train`
caps the train rows. `load_rows` parses every row with a format's parser."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

from prefopt.data.types import BadRows, PreferenceExample, one_line, read_json_rows, show
from utils import ConfigError


def file_rows(path: str, key: str, bad_rows: BadRows) -> tuple[str, Iterable[tuple[int, object]]]:
    """(label for messages, (row number, row) pairs) of a local file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dataset.{key}={path} does not exist; pass a local .jsonl, .json or .parquet file")
    if p.suffix in (".jsonl", ".json"):
        return str(path), read_json_rows(p, bad_rows)
    if p.suffix == ".parquet":
        import datasets

        try:
            table = datasets.load_dataset("parquet", data_files=str(p), split="train")
        except Exception as e:
            raise ConfigError(f"{path}: could not be read as Parquet ({one_line(e)}); check the file or convert it to "
                              ".jsonl")
        return str(path), enumerate(table, start=1)
    hint = "; decompress it first (e.g. gunzip)" if p.suffix in (".gz", ".bz2", ".xz", ".zst", ".zip") else ""
    raise ConfigError(f"dataset.{key}={path}: unsupported file type {show(p.suffix or '(none)')}; "
                      f"use .jsonl, .json or .parquet{hint}")


def hub_rows(cfg, split: str) -> tuple[str, Iterable[tuple[int, object]]]:
    name, hub = cfg.get("name"), cfg.get("hub")
    if not hub:
        raise ConfigError(f"dataset={name} needs dataset.path=<local .jsonl/.json/.parquet file> (it has no hub "
                          "dataset)")
    hub_split = (cfg.get("hub_train_split") or "train") if split == "train" else (cfg.get("hub_eval_split") or "test")
    kwargs = {"data_dir": cfg.hub_data_dir} if cfg.get("hub_data_dir") else {}
    import datasets

    try:
        table = datasets.load_dataset(hub, split=hub_split, **kwargs)
    except Exception as e:
        raise ConfigError(f"dataset={name} could not be loaded from the hub ({hub}, split {hub_split}): {one_line(e)}; "
                          "offline? pass dataset.path=<local .jsonl/.parquet file>")
    return f"{hub} ({hub_split} split)", enumerate(table, start=1)


def load_rows(cfg, split: str, bad_rows: BadRows | None, parse: Callable[[dict, str], PreferenceExample],
          keep: Callable[[Mapping, str], bool] | None = None) -> list[PreferenceExample]:
    """Rows of `split` ("train", or anything else for eval) parsed by `parse`,
    filtered by `keep`, then held out and capped as the config says."""
    train = split == "train"
    bad_rows = bad_rows or BadRows()
    path, eval_path = cfg.get("path"), cfg.get("eval_path")
    if eval_path and not path:
        raise ConfigError("dataset.eval_path is set but dataset.path is not; pass dataset.path=<train file> too")
    if path:
        from_eval_file = bool(eval_path) and not train
        label, rows = file_rows(eval_path if from_eval_file else path, "eval_path" if from_eval_file else "path",
                                 bad_rows)
        hold_out = not eval_path
    else:
        label, rows = hub_rows(cfg, split)
        hold_out = False

    examples = []
    for n, row in rows:
        where = f"{label}: row {n}"
        try:
            example = parse(row, where)
            if keep is None or keep(row, where):
                examples.append(example)
        except ConfigError as e:
            bad_rows(e)

    if hold_out:
        # One file for both splits: its last n_eval rows (after filters) are the eval split.
        n_eval = int(cfg.get("n_eval") or 0)
        if n_eval < 0:
            raise ConfigError(f"dataset.n_eval={n_eval} must be >= 0")
        if n_eval >= len(examples):
            raise ConfigError(f"dataset.path={path} has {len(examples)} usable rows, not more than "
                              f"dataset.n_eval={n_eval} "
                              "held out for eval; lower dataset.n_eval or pass dataset.eval_path=<eval file>")
        cut = len(examples) - n_eval
        examples = examples[:cut] if train else examples[cut:]
    n_train = cfg.get("n_train")
    if train and n_train is not None:
        if int(n_train) < 1:
            raise ConfigError(f"dataset.n_train={n_train} must be a positive number of rows, or null for all")
        examples = examples[: int(n_train)]
    return examples
