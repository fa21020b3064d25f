"""The leaf of the data package: what a row is, what a malformed row does,
and how fields are read from a row with one-line errors naming file, row
and field. Every format module imports from here; nothing here imports them.
Messages stay on one line: values are shown JSON-escaped."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from utils import ConfigError


@dataclass(frozen=True)
class PreferenceExample:
    """One row. A pair: `chosen` is preferred to `rejected`. An SFT row:
    `rejected` is None. An unpaired row (KTO's data, see unpaired.py): the
    completion is in `chosen`, `rejected` is None and `label` says whether
    it is desirable (True) or undesirable (False); `label` is None otherwise."""
    prompt: str
    chosen: str
    rejected: str | None = None
    label: bool | None = None


class BadRows:
    """What to do with a malformed row: raise its one-line error at once (the
    default), or, with data.skip_bad_rows=true, count it and go on."""

    def __init__(self, skip: bool = False):
        self.skip, self.seen = skip, []

    def __call__(self, error: ConfigError) -> None:
        if not self.skip:
            raise error
        if str(error) not in self.seen:   # a file read for both splits reports a row once
            self.seen.append(str(error))

    @property
    def count(self) -> int:
        return len(self.seen)

    @property
    def first(self) -> str | None:
        return self.seen[0] if self.seen else None


def read_json_rows(path: str | Path, bad_rows: BadRows | None = None) -> list[tuple[int, dict]]:
    """(row number, object) pairs from a .jsonl file (one object a line) or a
    .json file holding a list of objects. Errors name the file and row."""
    bad_rows = bad_rows or BadRows()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset.path={path} does not exist")
    raw = path.read_bytes()
    if path.suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            row = raw[: e.start].count(b"\n") + 1
            raise ConfigError(f"{path}: line {row}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}")
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of rows")
        return list(enumerate(data, start=1))
    rows = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as e:
            bad_rows(ConfigError(f"{path}: row {lineno}: not valid UTF-8 (byte {e.start} of the row); "
                                 "re-encode the file as UTF-8"))
        except json.JSONDecodeError as e:
            bad_rows(ConfigError(f"{path}: row {lineno}: invalid JSON ({e.msg})"))
    return rows


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def show(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_row(row, where: str, hint: str) -> Mapping:
    if not isinstance(row, Mapping):
        raise ConfigError(f"{where}: expected an object, got {json_type(row)}; {hint}")
    return row


def row_field(row: Mapping, name: str, where: str, hint: str):
    if name not in row:
        raise ConfigError(f'{where}: missing field "{name}"; {hint}')
    if row[name] is None:
        raise ConfigError(f'{where}: field "{name}" is null; {hint}')
    return row[name]


def check_unicode(value: str, what: str) -> str:
    """`value` if it is valid Unicode text. JSON's "\\ud800" escape gives a
    lone UTF-16 surrogate, which json.loads accepts but no tokenizer can encode
    (a TypeError deep inside `tokenizers`); `what` starts the error message."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        raise ConfigError(f"{what} holds a lone UTF-16 surrogate (\\u{code:04x} at character {e.start + 1}), which "
                          "is not text; fix that JSON escape (surrogates come in high-low pairs) or drop the row"
                          ) from None
    return value


def row_text(row: Mapping, name: str, where: str, hint: str) -> str:
    value = row_field(row, name, where, hint)
    if not isinstance(value, str):
        raise ConfigError(f'{where}: field "{name}" must be a string, got {json_type(value)}; {hint}')
    if not value.strip():
        raise ConfigError(f'{where}: field "{name}" is empty; {hint}')
    return check_unicode(value, f'{where}: field "{name}"')
