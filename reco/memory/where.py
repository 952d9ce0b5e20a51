"""Where-filters: the rows of a memory whose metadata satisfy a SQL WHERE clause (DuckDB).

The clause sees one relation `t`, a row per memory row in row order, with these columns:

- every metadata column of the shards' Parquet tables, of the type Arrow reads (strings,
  integers, floats, bools, dates, lists, structs, ...). A column missing from some shards is
  NULL there; a column of null type in one shard and typed in another takes the typed one, and
  integers meeting floats become floats (pyarrow's permissive promotion). A metadata column named
  like a computed one (case-insensitively) is renamed `meta_<name>`; this includes the `row`
  column the writer stores when rows were added without metadata (`meta_row`, the row within
  its shard).
- `id` BIGINT: the row's stable id (`memory.ids`, kept through deletes and compaction);
- `label` BIGINT, never NULL: the row's class label. Absent when the memory has no labels, so a
  clause naming it fails with DuckDB's binder error (rather than silently selecting nothing);
- `shard` BIGINT: the index of the shard holding the row (its place in the manifest);
- `row` BIGINT: the row number in this version of the memory.

The clause is user text and runs in a sandbox: the only SQL executed is
`SELECT row FROM t WHERE (<clause>)`, one statement, on a private in-memory DuckDB connection
that holds only `t` (an Arrow table registered in memory; no file is read through SQL), with
external access (files, URLs, extensions, Python variables) disabled after registering and the
configuration locked, so nothing in the clause can turn access back on. Before DuckDB runs it,
DuckDB's own tokenizer checks that the clause holds no `;` outside literals and comments (DuckDB
would run a second statement) and closes no parenthesis it did not open (which would let it
escape the WHERE, e.g. into a UNION).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .files import flat
from .manifest import METADATA_FILE, SHARDS_DIR, MemoryFormatError
from .store import inside, open_regular

if TYPE_CHECKING:
    import pyarrow as pa

    from .store import Memory

COMPUTED = ("id", "label", "shard", "row")
RENAMED_PREFIX = "meta_"
CACHE_ENTRIES = 32
_ROWS = "__reco_rows__"  # stands in for a shard none of whose columns are needed

# (memory root, version token, clause) -> mask; least recently used first.
_cache: OrderedDict[tuple[str, str, str], Tensor] = OrderedDict()
_cache_lock = threading.Lock()


def where_mask(memory: Memory, clause: str) -> Tensor:
    """bool [memory.rows] (CPU): True where the row satisfies the SQL WHERE clause over the
    memory's metadata (columns: see this module's docstring). Deleted (tombstoned) rows are
    not masked out here: combine with memory.live.

    Raises TypeError if clause is not a str; ValueError, quoting the clause and DuckDB's message,
    if it is not a valid read-only filter or selects no rows; ImportError without DuckDB.
    Masks are cached per (memory folder, committed version, clause); each call returns a fresh
    tensor.
    """
    if not isinstance(clause, str):
        raise TypeError(f"a where clause must be a str, got {type(clause).__name__}")
    if not clause.strip():
        raise ValueError("the where clause is empty; give a SQL condition, e.g. \"source = 'x'\"")
    duckdb = _duckdb()
    key = (str(memory.root.resolve()), _version_token(memory), clause)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit.clone()
    needed = _check_clause(duckdb, clause)
    mask = _evaluate(duckdb, memory, clause, needed)
    with _cache_lock:
        _cache[key] = mask
        _cache.move_to_end(key)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return mask.clone()


def clear_cache() -> None:
    """Forgets every cached mask."""
    with _cache_lock:
        _cache.clear()


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise ImportError(
            "where-filters run on DuckDB, which is not installed: pip install 'reco[sql]'"
        ) from None
    return duckdb


def _ids(memory: Memory) -> np.ndarray:
    """The rows' stable int64 ids, in row order (the one place the relation's `id` comes from)."""
    ids = memory.ids.detach().cpu().numpy()
    if ids.shape != (memory.rows,):
        raise MemoryFormatError(f"{memory.root}: {ids.shape} ids for {memory.rows} rows")
    return ids.astype(np.int64, copy=False)


def _version_token(memory: Memory) -> str:
    """Names one committed state of the memory: its version (one more with each commit) and the
    sha256 of its manifest, which lists every file's sha256 (a version number alone repeats when
    a folder is deleted and built again)."""
    digest = hashlib.sha256(memory.manifest.to_json().encode()).hexdigest()
    return f"{memory.version}:{digest}"


def _check_clause(duckdb: Any, clause: str) -> set[str] | None:
    """Refuses what would make the clause more than one expression inside the WHERE; returns the
    lower-cased names it may refer to (None: it may read any column, e.g. through `*`)."""
    try:
        tokens = duckdb.tokenize(clause)
    except duckdb.Error as e:
        raise ValueError(f"where clause {clause!r} is not valid SQL: {e}") from None
    ends = [int(p) for p, _ in tokens[1:]] + [len(clause)]
    names: set[str] | None = set()
    depth = 0
    for (start, kind), end in zip(tokens, ends):
        kind = str(kind).rpartition(".")[2]
        text = clause[int(start) : end].strip()
        if kind == "operator":
            if ";" in text:
                raise ValueError(
                    f"where clause {clause!r} holds a statement separator (;): DuckDB would run "
                    "what follows it as another statement. A where clause is one condition"
                )
            for ch in text:
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth < 0:
                    raise ValueError(
                        f"where clause {clause!r} closes a parenthesis it did not open; a where "
                        "clause is one condition and cannot reach past the WHERE"
                    )
            if "*" in text:
                names = None
        elif kind in ("identifier", "keyword") and names is not None:
            name = text[1:-1].replace('""', '"') if text.startswith('"') else text
            if name.lower() in ("t", "columns"):  # the whole row as a struct; columns by pattern
                names = None
            else:
                names.add(name.lower())
    return names


def _exposed(name: str) -> str:
    return RENAMED_PREFIX + name if name.lower() in COMPUTED else name


def _concat(tables: list[pa.Table], root: object) -> pa.Table:
    import pyarrow as pa

    # pyarrow < 14 promotes only nulls and missing columns (ArrowTypeError is a TypeError, so
    # the version is read rather than the keyword tried).
    permissive = int(pa.__version__.split(".")[0]) >= 14
    try:
        if permissive:
            return pa.concat_tables(tables, promote_options="permissive")
        return pa.concat_tables(tables, promote=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(
            f"the metadata of {root} cannot be filtered: its shards store a column with "
            f"incompatible types ({flat(e)})"
        ) from None


def _relation(memory: Memory, needed: set[str] | None) -> pa.Table:
    """The relation `t`: the metadata columns in needed (all if None), then the computed ones.
    Reads each shard's Parquet file once (its footer and the columns needed), through the checks
    Memory.metadata makes: a regular file inside the memory, of the size the manifest gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = memory.manifest.shards
    tables = []
    for shard in shards:
        if needed is not None and not needed - set(COMPUTED):
            break  # the clause names computed columns only: no Parquet to read
        path = memory.root / SHARDS_DIR / shard.name / METADATA_FILE
        inside(memory.root, path, f"shard {shard.name!r} file {METADATA_FILE!r}")
        fd = open_regular(path, "shard file", size=shard.files[METADATA_FILE].bytes)
        try:
            with os.fdopen(fd, "rb") as f:  # Parquet reads its footer and the chunks it needs
                file = pq.ParquetFile(f)
                names = file.schema_arrow.names
                if needed is not None:
                    names = [n for n in names if _exposed(n).lower() in needed]
                table = file.read(columns=names)
                rows = file.metadata.num_rows
        except (pa.ArrowException, OSError, ValueError) as e:
            raise MemoryFormatError(
                f"shard file {path} is not readable Parquet ({flat(e)})"
            ) from None
        if rows != shard.rows:
            raise MemoryFormatError(
                f"shard file {path} has {rows} rows, the manifest says {shard.rows}"
            )
        if table.num_columns:
            tables.append(table.rename_columns([_exposed(n) for n in table.column_names]))
        else:  # keeps the row count, which a table without columns would lose
            tables.append(pa.table({_ROWS: pa.nulls(shard.rows)}))
    sizes = np.array([s.rows for s in shards], dtype=np.int64)
    computed: dict[str, Any] = {"id": _ids(memory)}
    if memory.labels is not None:
        computed["label"] = memory.labels.detach().cpu().numpy().astype(np.int64, copy=False)
    computed["shard"] = np.repeat(np.arange(len(shards), dtype=np.int64), sizes)
    computed["row"] = np.arange(memory.rows, dtype=np.int64)
    if not tables:
        return pa.table(computed)
    table = _concat(tables, memory.root) if len(tables) > 1 else tables[0]
    if _ROWS in table.column_names:
        table = table.drop_columns([_ROWS])
    for name, values in computed.items():
        table = table.append_column(name, pa.array(values))
    return table


def _connect(duckdb: Any, table: pa.Table) -> Any:
    """A private in-memory connection holding only `t`, sealed: no files, URLs, extensions or
    Python variables reachable, and no setting changeable, from any SQL run on it."""
    con = duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    try:
        con.register("t", table)
        try:  # replacement scans of Python variables (external access also disables them)
            con.execute("SET python_enable_replacements = false")
        except duckdb.Error:
            pass  # a DuckDB without that setting
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _evaluate(duckdb: Any, memory: Memory, clause: str, needed: set[str] | None) -> Tensor:
    table = _relation(memory, needed)
    con = _connect(duckdb, table)
    try:
        # The newline keeps a trailing `--` comment from swallowing the closing parenthesis.
        rows = con.execute(f"SELECT row FROM t WHERE (\n{clause}\n)").fetchnumpy()["row"]
    except duckdb.Error as e:
        if needed is not None:  # a name the token scan missed: retry over every column
            return _evaluate(duckdb, memory, clause, None)
        if isinstance(e, duckdb.PermissionException):
            raise ValueError(
                f"where clause {clause!r} reaches outside the memory's metadata (files, URLs and "
                f"extensions are never open to a where clause): {e}"
            ) from None
        columns = ", ".join(table.column_names)
        hint = " (it has no labels, so no label column)" if memory.labels is None else ""
        raise ValueError(
            f"where clause {clause!r} is not a valid filter over the memory's metadata "
            f"(columns: {columns}{hint}): {e}"
        ) from None
    finally:
        con.close()
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu" or (rows.size and (rows.min() < 0 or rows.max() >= memory.rows)):
        raise ValueError(f"where clause {clause!r} did not evaluate to a filter over the rows")
    if not rows.size:
        raise ValueError(
            f"where clause {clause!r} selects no rows of the memory at {memory.root} "
            f"({memory.rows} rows)"
        )
    mask = torch.zeros(memory.rows, dtype=torch.bool)
    mask[torch.from_numpy(rows.astype(np.int64, copy=False))] = True
    return mask
