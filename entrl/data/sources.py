"""Problem/answer records from JSONL, JSON, Parquet files or Hugging Face hub datasets.

Design decisions:
- A `Record` is (id, problem, answer, extra, messages): the three fields every
  task needs plus every other column untouched in `extra` (e.g. `se`,
  `pass_rate`, `level`), so a dataset annotated with semantic entropy
  round-trips through `load_records` / `write_records`.
- The problem column holds either text or a chat prompt: a list of
  `{"role": ..., "content": ...}` messages (verl's `prompt` column, TRL's
  conversational `prompt`). A chat prompt is kept as given in
  `Record.messages` (role and content of each turn, other keys dropped) and its
  last user message becomes `Record.problem`, the text that deduplication,
  decontamination and logs read. It must end with a user turn: a trailing
  assistant turn means a full conversation (SFT data), whose answer would
  otherwise sit inside the prompt.
- Every column name (`id_key`, `problem_key`, `answer_key`) may be a dotted
  path into nested columns: `reward_model.ground_truth`, `extra_info.index`.
  A column literally named with the dots is found first. A dotted key leaves
  its top-level column in `extra` (it holds more, e.g. verl's
  `reward_model.style`); `Record.to_row(...)` with the same keys writes the
  values back to the same places, so an annotated verl file keeps its layout.
- Local files are read directly (JSON lines with `json`, Parquet with
  `pyarrow`), not through `datasets.load_dataset`: errors can then name the
  file and line, mixed-type columns do not break schema inference, and no
  Arrow cache is written. Hub ids go through `datasets.load_dataset(id,
  split=...)`. A directory means all its `.jsonl`/`.json`/`.parquet` files,
  sorted by name, concatenated.
- A required column that does not exist (in the Parquet/hub schema, or in the
  first JSON row) is a ValueError naming it and the available columns. A
  single row with a missing/empty problem or answer is either a ValueError
  naming the row (id, file and line or index) or, with `on_bad_row="skip"`, a
  counted, logged skip.
- Answers may be numbers (`number_text`): ints become `"27"`; a float becomes
  the decimal its shortest round-trip repr denotes, never a trip through
  binary: `27.0` -> `"27"` (several benchmark dumps store integers as floats),
  `1e23` -> `"100000000000000000000000"` (not `int(1e23)`,
  99999999999999991611392), `2.5` -> `"2.5"`, `1e-07` -> `"0.0000001"`
  (positional: LaTeX parsers read `e` as Euler's number). Infinite floats,
  lists, dicts and bools are bad rows: there is no safe string form.
- `id_key=""` uses the global row index as the id. Duplicate ids are an error:
  the semantic-entropy annotation resumes by id.
- `write_records` writes JSONL or Parquet by suffix through a temporary file
  and an atomic rename, so an interrupted annotation never leaves half a file.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from entrl import hub
from entrl.rundir import READ_SCHEMES, as_path, is_remote

log = logging.getLogger(__name__)

_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_SUFFIXES = _JSON_SUFFIXES + _PARQUET_SUFFIXES


@dataclass(frozen=True)
class Record:
    """One problem with its reference answer; `extra` holds every other column."""

    id: str
    problem: str  # the problem text (for a chat prompt: its last user message)
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)
    messages: tuple[dict[str, str], ...] = ()  # the chat prompt as given; () for a plain-text problem

    @property
    def prompt(self) -> str | list[dict[str, str]]:
        """What the prompt is built from: the chat messages when there are any, else the problem text."""
        return [dict(m) for m in self.messages] if self.messages else self.problem

    def to_row(self, *, id_key: str = "id", problem_key: str = "problem", answer_key: str = "answer") -> dict[str, Any]:
        """The row written by `write_records`: id, prompt (text or messages) and answer under the given
        (possibly dotted) keys, plus the extras; `id_key=""` writes the id as `id`."""
        fields = ((id_key or "id", self.id), (problem_key, self.prompt), (answer_key, self.answer))
        row: dict[str, Any] = {key: value for key, value in fields if "." not in key}  # flat keys lead the row
        row.update({k: v for k, v in self.extra.items() if k not in row})
        for key, value in fields:
            if "." in key and not (key == id_key and str(_plain(_lookup(row, key))) == self.id):  # keeps an int id int
                _put(row, key, value)
        return row


@dataclass(frozen=True)
class LoadResult:
    records: list[Record]
    skipped: int  # rows dropped by on_bad_row="skip"
    skipped_ids: list[str]  # their ids (or "<file>:<line>" when the id itself is missing)


@dataclass(frozen=True)
class _RawRow:
    row: dict[str, Any]
    where: str  # "file.jsonl line 12" / "hub:name[train] index 3"


class _BadRow(ValueError):
    pass


_MISSING = object()


def _lookup(row: dict[str, Any], key: str) -> Any:
    """`row[key]`, or the nested value at the dotted path `key`; `_MISSING` when absent."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _put(row: dict[str, Any], key: str, value: Any) -> None:
    """Set `row[key]`, or the nested value at the dotted path (copying the dicts on the way)."""
    parts = key.split(".") if key not in row else [key]
    node = row
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value


def number_text(value: int | float | np.integer | np.floating) -> str:
    """A number as text without a trip through binary (see the module docstring): 27.0 -> "27",
    1e23 -> "100000000000000000000000", 1e-07 -> "0.0000001". ValueError for inf."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if not math.isfinite(float(value)):
        raise ValueError(f"{value!r} is not a finite number")
    # The shortest digits that round-trip (what the data's author wrote), in positional form.
    text = np.format_float_positional(value, unique=True, trim="-")
    return "0" if text == "-0" else text


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise ValueError(f"{path}: directory has no {'/'.join(_SUFFIXES)} files")
        return files
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(_SUFFIXES)}")
    return [path]


def _json_rows(path: Path) -> tuple[list[str] | None, Iterator[_RawRow]]:
    """Columns (keys of the first row) and the rows of a JSON-lines file or a JSON array file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        items = [(_RawRow(r, f"{path.name} item {i}") if isinstance(r, dict) else r) for i, r in enumerate(data)]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg})") from e
            items.append(_RawRow(obj, f"{path.name} line {lineno}") if isinstance(obj, dict) else obj)
    for i, item in enumerate(items):
        if not isinstance(item, _RawRow):
            raise ValueError(f"{path}: row {i} is a {type(item).__name__}, expected a JSON object")
    columns = list(items[0].row) if items else None
    return columns, iter(items)


def _parquet_rows(path: Path, max_rows: int) -> tuple[list[str], Iterator[_RawRow]]:
    import pyarrow.parquet as pq  # noqa: PLC0415 (Parquet only)

    pf = pq.ParquetFile(path.open("rb") if is_remote(path) else path)
    columns = list(pf.schema_arrow.names)

    def rows() -> Iterator[_RawRow]:
        index = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield _RawRow(row, f"{path.name} index {index}")
                index += 1
                if max_rows and index >= max_rows:
                    return

    return columns, rows()


def _hub_rows(name: str, split: str) -> tuple[list[str], Iterator[_RawRow]]:
    try:
        ds = hub.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (FileNotFound, ConnectionError, DatasetNotFound...)
        raise ValueError(f"could not load {name!r} (split {split!r}) as a local file or hub dataset: {e}") from e
    return list(ds.column_names), (_RawRow(r, f"hub:{name}[{split}] index {i}") for i, r in enumerate(ds))


def _format_hint(columns: list[str]) -> str:
    """The keys that read a verl-style or TRL conversational dataset, when `columns` look like one."""
    if "prompt" not in columns:
        return ""
    if "reward_model" in columns:
        return (" (this looks like a verl dataset: set data.problem_key=prompt "
                "data.answer_key=reward_model.ground_truth, and data.id_key=extra_info.index or \"\")")
    return " (a TRL-style dataset? set data.problem_key=prompt and data.answer_key=<its answer column>)"


def _check_columns(columns: list[str] | None, first: dict[str, Any] | None, required: dict[str, str],
                   origin: str) -> None:
    """Every configured key names a column (a dotted key: its top-level column, and its path in the first row)."""
    if columns is None:
        return
    for what, key in required.items():
        if not key:
            continue
        top = key if key in columns or "." not in key else key.split(".", 1)[0]
        if top not in columns:
            hint = _format_hint(columns) or (" (set data.id_key=\"\" to use the row index)" if what == "id_key" else "")
            raise ValueError(
                f"{origin}: column {key!r} ({what}) not found; available columns: {columns}{hint}"
            )
        if first is not None and _lookup(first, key) is _MISSING:
            parent = key.rsplit(".", 1)[0]
            node = _lookup(first, parent)
            has = f"{parent!r} has keys {sorted(node)}" if isinstance(node, dict) else f"{parent!r} is not a mapping"
            raise ValueError(f"{origin}: column {key!r} ({what}) not found in the first row; {has}")


def _as_text(value: Any, what: str) -> str:
    if value is None or value is _MISSING or (isinstance(value, float) and math.isnan(value)):
        raise _BadRow(f"{what} is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise _BadRow(f"{what} is a {type(value).__name__} ({value!r:.60}), expected a string or a number")
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            value = number_text(value)
        except ValueError as e:
            raise _BadRow(f"{what}: {e}") from None
    text = str(value)
    if not text.strip():
        raise _BadRow(f"{what} is empty")
    return text


def _as_messages(value: Sequence[Any], what: str) -> tuple[dict[str, str], ...]:
    """A chat prompt: `{"role", "content"}` strings per turn, ending with a user turn."""
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRow(f"{what}: message {i} is {m!r:.80}, expected {{'role': str, 'content': str}}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not messages:
        raise _BadRow(f"{what} is an empty list of messages")
    if messages[-1]["role"] != "user":
        raise _BadRow(f"{what}: the last message is from {messages[-1]['role']!r}; a prompt must end with the "
                      "user's turn (is this a full conversation, e.g. SFT data?)")
    if not messages[-1]["content"].strip():
        raise _BadRow(f"{what}: the last user message is empty")
    return tuple(messages)


def _as_problem(value: Any, what: str) -> tuple[str, tuple[dict[str, str], ...]]:
    """(problem text, chat messages or ()) of a problem cell: a string or a list of chat messages."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        messages = _as_messages(value, what)
        return messages[-1]["content"], messages
    if not isinstance(value, str) and value is not None and value is not _MISSING:
        raise _BadRow(f"{what} is a {type(value).__name__}, expected a string or a list of chat messages")
    return _as_text(value, what), ()


def names_hub_dataset(source: str | Path) -> bool:
    """Whether `load_records` reads `source` from the hub: no such path, and no file suffix, path prefix or
    bucket scheme (those are files that do not exist)."""
    text = str(source)
    return not (Path(text).exists() or is_remote(text) or text.endswith(_SUFFIXES) or text.startswith((".", "/", "~")))


def source_columns(source: str | Path, *, split: str = "train") -> list[str]:
    """Column names of a file, a directory's first file or a hub dataset (what `load_records` would check)."""
    path = Path(source)
    if path.exists():
        f = _files_of(path)[0]
        if f.suffix in _PARQUET_SUFFIXES:
            import pyarrow.parquet as pq  # noqa: PLC0415 (Parquet only)

            return list(pq.ParquetFile(f).schema_arrow.names)
        return _json_rows(f)[0] or []
    if not names_hub_dataset(source):
        raise ValueError(f"{source}: file not found (and it does not look like a hub id)")
    return _hub_rows(str(source), split)[0]


def load_records(
    source: str | Path,
    *,
    split: str = "train",
    id_key: str = "id",
    problem_key: str = "problem",
    answer_key: str = "answer",
    on_bad_row: str = "error",
    max_rows: int = 0,
) -> LoadResult:
    """Read records from a file, a directory of files, or a hub id (see the module docstring)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row={on_bad_row!r}: must be 'error' or 'skip'")
    if max_rows < 0:
        raise ValueError(f"max_rows={max_rows}: must be >= 0 (0 = all rows)")
    required = {"id_key": id_key, "problem_key": problem_key, "answer_key": answer_key}
    # gs:// (any etils.epath filesystem) reads through the same code as a local path.
    path = as_path(source, "data path", schemes=READ_SCHEMES) if is_remote(source) else Path(source)
    sources: list[tuple[str, list[str] | None, Iterator[_RawRow]]] = []
    if path.exists():
        for f in _files_of(path):
            columns, rows = _parquet_rows(f, max_rows) if f.suffix in _PARQUET_SUFFIXES else _json_rows(f)
            sources.append((str(f), columns, rows))
    elif not names_hub_dataset(source):
        raise ValueError(f"{source}: file not found (and it does not look like a hub id)")
    else:
        split_spec = f"{split}[:{max_rows}]" if max_rows else split
        columns, rows = _hub_rows(str(source), split_spec)
        sources.append((f"hub:{source}", columns, rows))

    records: list[Record] = []
    skipped_ids: list[str] = []
    seen: dict[str, str] = {}
    index = 0
    for origin, columns, rows in sources:
        first = next(rows, None)
        _check_columns(columns, first.row if first is not None else None, required, origin)
        for raw in itertools.chain([first] if first is not None else [], rows):
            if max_rows and index >= max_rows:
                break
            row = raw.row
            rid_value = _plain(_lookup(row, id_key)) if id_key else _MISSING
            rid = None if rid_value is _MISSING or rid_value is None or rid_value == "" else str(rid_value)
            if rid is None and not id_key:
                rid = str(index)
            index += 1
            try:
                if rid is None:
                    raise _BadRow(f"id column {id_key!r} is missing/empty")
                problem, messages = _as_problem(_lookup(row, problem_key), f"problem column {problem_key!r}")
                answer = _as_text(_lookup(row, answer_key), f"answer column {answer_key!r}")
            except _BadRow as e:
                label = f"row id={rid!r} ({raw.where})" if rid is not None else f"row {raw.where}"
                if on_bad_row == "error":
                    raise ValueError(f"{label}: {e}; fix the row or set data.on_bad_row=skip") from None
                skipped_ids.append(rid if rid is not None else raw.where)
                continue
            if rid in seen:
                raise ValueError(f"duplicate id {rid!r}: {seen[rid]} and {raw.where}; ids must be unique")
            seen[rid] = raw.where
            extra = {k: v for k, v in row.items() if k not in (id_key, problem_key, answer_key)}
            records.append(Record(rid, problem, answer, extra, messages))
        if max_rows and index >= max_rows:
            break

    if skipped_ids:
        log.warning(
            "%s: skipped %d bad row(s) with a missing/empty problem or answer (first: %s)",
            source, len(skipped_ids), skipped_ids[:5],
        )
    if not records:
        raise ValueError(f"{source}: no usable rows (read {index}, skipped {len(skipped_ids)})")
    return LoadResult(records, len(skipped_ids), skipped_ids)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python values, recursively (JSON and Arrow both accept the result)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_records(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows (e.g. `Record.to_row()` plus annotation columns) as JSONL or Parquet, chosen by suffix."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: write_records supports .jsonl and .parquet, got {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = [_plain(r) for r in rows]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for r in plain:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa  # noqa: PLC0415 (Parquet only)
            import pyarrow.parquet as pq  # noqa: PLC0415 (Parquet only)

            columns = list(dict.fromkeys(k for r in plain for k in r))
            arrays = []
            for col in columns:
                try:
                    arrays.append(pa.array([r.get(col) for r in plain]))
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise ValueError(f"{path}: column {col!r} mixes value types ({e}); make it one type") from e
            pq.write_table(pa.table(arrays, names=columns), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
