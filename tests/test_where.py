"""Where-filters: masks against an independent Python evaluation of the same predicates over the
rows written, the sealed DuckDB connection (no file read or written, one statement), errors,
the cache, and exactness with search restricted to the mask."""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from topk_check import assert_topk_match

import reco
from reco.memory import EncoderInfo, Memory, MemoryWriter, ModalityInfo
from reco.memory import where as where_module
from reco.memory.where import where_mask

duckdb = pytest.importorskip("duckdb")

MODS = {
    "image": ModalityInfo(6, "float16", EncoderInfo("enc-a")),
    "text": ModalityInfo(8, "float32", EncoderInfo("enc-b")),
}
LICENSES = ["mit", "cc-by", "cc0", None]
TAGS = ["cat", "dog", "car", "tree"]


def _columns(rng: np.random.Generator, n: int, start: int, kind: str) -> dict[str, list]:
    """Random metadata of every type the writer stores; kind varies the schema by shard."""
    cols: dict[str, list] = {
        "caption": [f"item {start + i}" for i in range(n)],
        "license": [LICENSES[j] for j in rng.integers(0, len(LICENSES), n)],
        "score": rng.random(n).tolist(),
        "flag": [[True, False, None][j] for j in rng.integers(0, 3, n)],
        "Source": [["web", "book"][j] for j in rng.integers(0, 2, n)],
    }
    if kind == "no-year":  # a column of null type in this shard only
        cols["year"] = [None] * n
    else:
        cols["year"] = [None if j < 0 else int(j) for j in rng.integers(-3, 30, n) + 2000]
    if kind == "other":  # no tags, no day, no info; an extra column the others lack
        cols["extra"] = rng.integers(0, 100, n).tolist()
    else:
        cols["tags"] = [list(rng.choice(TAGS, rng.integers(0, 3), replace=False)) for _ in range(n)]
        days = rng.integers(0, 1500, n)
        cols["day"] = [datetime.date(2018, 1, 1) + datetime.timedelta(int(d)) for d in days]
        if kind == "narrow-info":  # a struct with fewer fields
            cols["info"] = [{"lang": ["en", "fr"][j]} for j in rng.integers(0, 2, n)]
        else:
            cols["info"] = [
                None if j == 2 else {"lang": ["en", "fr"][j], "w": int(w)}
                for j, w in zip(rng.integers(0, 3, n), rng.integers(0, 10, n))
            ]
    return cols


def _build(path, shards, seed=0, has_labels=True):
    rng = np.random.default_rng(seed)
    start = 0
    with MemoryWriter(path, MODS, has_labels=has_labels, shard_rows=1 << 20) as w:
        for n, kind in shards:
            emb = {m: rng.standard_normal((n, i.dim)).astype(np.float32) for m, i in MODS.items()}
            labels = rng.integers(0, 5, n) if has_labels else None
            w.add(emb, labels=labels, metadata=_columns(rng, n, start, kind))
            w.commit()  # one shard per batch, each with its own schema
            start += n
    return Memory.open(path)


SHARDS = [(150, "full"), (90, "no-year"), (120, "other"), (70, "narrow-info"), (110, "full")]


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("where") / "m", SHARDS)


@pytest.fixture(autouse=True)
def _fresh_cache():
    where_module.clear_cache()
    yield
    where_module.clear_cache()


def _records(mem: Memory) -> list[dict]:
    """Each row's metadata as written (the shard's own columns), plus id, label, shard, row."""
    rows = mem.metadata(range(mem.rows))
    ids = mem.ids.tolist()
    shard_of = np.repeat(np.arange(len(mem.manifest.shards)), [s.rows for s in mem.manifest.shards])
    for r, rec in enumerate(rows):
        rec.update(id=ids[r], label=int(mem.labels[r]), shard=int(shard_of[r]), row=r)
    return rows


def _ge(x, v):
    return x is not None and x >= v


# SQL's three-valued logic: a NULL comparison selects nothing, hence the `is not None` tests.
PREDICATES = {
    "license = 'cc-by'": lambda r: r.get("license") == "cc-by",
    "year >= 2015 AND flag": lambda r: _ge(r.get("year"), 2015) and r["flag"] is True,
    "score < 0.3 OR license IS NULL": lambda r: r["score"] < 0.3 or r["license"] is None,
    "list_contains(tags, 'cat')": lambda r: r.get("tags") is not None and "cat" in r["tags"],
    "info.lang = 'en'": lambda r: (r.get("info") or {}).get("lang") == "en",
    "info.w > 5": lambda r: _ge((r.get("info") or {}).get("w"), 6),
    "label IN (0, 2) AND shard <> 1": lambda r: r["label"] in (0, 2) and r["shard"] != 1,
    "id % 7 = 3": lambda r: r["id"] % 7 == 3,
    "caption LIKE '%9%'": lambda r: "9" in r["caption"],
    "NOT (license = 'mit')": lambda r: r["license"] is not None and r["license"] != "mit",
    "extra IS NOT NULL AND extra < 50": lambda r: r.get("extra") is not None and r["extra"] < 50,
    "row BETWEEN 10 AND 40 OR row > 500": lambda r: 10 <= r["row"] <= 40 or r["row"] > 500,
    "day >= DATE '2021-01-01'": lambda r: _ge(r.get("day"), datetime.date(2021, 1, 1)),
    "year IS NULL AND flag IS NOT NULL": lambda r: r.get("year") is None and r["flag"] is not None,
    "source = 'web' AND NOT flag": lambda r: r["Source"] == "web" and r["flag"] is False,
    "t.license = 'mit'": lambda r: r["license"] == "mit",  # the row as a struct: all columns
    "COLUMNS('lic.*') = 'cc0'": lambda r: r["license"] == "cc0",
    "\"license\" = 'mit' -- a comment; with a ;": lambda r: r["license"] == "mit",
    "caption <> 'a;b' AND (label = 1 OR (label = 3))": lambda r: r["label"] in (1, 3),
}


def test_masks_equal_a_python_evaluation_of_the_rows_written(memory):
    records = _records(memory)
    for clause, predicate in PREDICATES.items():
        want = torch.tensor([bool(predicate(r)) for r in records])
        assert 0 < int(want.sum()) < memory.rows, clause  # each predicate selects some rows
        got = where_mask(memory, clause)
        assert got.dtype == torch.bool and got.shape == (memory.rows,), clause
        assert torch.equal(got, want), clause


def test_columns_and_types(memory):
    """The relation holds every metadata column of every shard plus id, label, shard, row."""
    table = where_module._relation(memory, None)
    names = table.column_names
    assert names[-4:] == ["id", "label", "shard", "row"]
    for col in ("caption", "license", "score", "flag", "Source", "year", "extra", "tags", "info"):
        assert col in names
    import pyarrow as pa

    for col in ("id", "label", "shard", "row"):
        assert table.schema.field(col).type == pa.int64()
    assert table.schema.field("info").type.num_fields == 2  # the narrow shard's struct widened
    # Only the columns a clause names are read.
    assert where_module._relation(memory, {"license", "and"}).column_names[0] == "license"
    assert where_module._relation(memory, {"row"}).column_names == ["id", "label", "shard", "row"]


def test_memory_without_labels_or_metadata(tmp_path):
    rng = np.random.default_rng(3)
    with MemoryWriter(tmp_path / "m", MODS, shard_rows=20) as w:
        for _ in range(3):
            w.add({m: rng.standard_normal((20, i.dim)) for m, i in MODS.items()})
    mem = Memory.open(tmp_path / "m")
    assert where_mask(mem, "row >= 50 AND shard = 2").nonzero().squeeze(1).tolist() == list(
        range(50, 60)
    )
    # The writer's placeholder `row` column (the row within its shard) is renamed.
    assert torch.equal(where_mask(mem, "meta_row = 0"), torch.arange(60) % 20 == 0)
    with pytest.raises(ValueError, match=r"(?s)no labels.*Binder Error.*label"):
        where_mask(mem, "label = 1")


def test_metadata_types_that_cannot_be_merged_are_a_clear_error(tmp_path):
    rng = np.random.default_rng(4)
    with MemoryWriter(tmp_path / "m", MODS, shard_rows=1 << 20) as w:
        for values in (["a", "b"], [1, 2]):
            w.add(
                {m: rng.standard_normal((2, i.dim)) for m, i in MODS.items()},
                metadata={"x": values},
            )
            w.commit()
    mem = Memory.open(tmp_path / "m")
    with pytest.raises(ValueError, match=r"incompatible types.*x"):
        where_mask(mem, "x = 'a'")
    assert where_mask(mem, "row = 1").tolist() == [False, True, False, False]  # x not read


@pytest.mark.parametrize("clause", [None, 3, b"row = 1", ["row = 1"]])
def test_a_clause_must_be_a_str(memory, clause):
    with pytest.raises(TypeError, match="must be a str"):
        where_mask(memory, clause)


@pytest.mark.parametrize(
    "clause, match",
    [
        ("license = = 'mit'", "Parser Error"),
        ("nope = 1", r"(?s)Binder Error.*nope"),
        ("license::INTEGER = 1", "Conversion Error"),
        ("sum(score) > 1", "aggregates"),
        ("score >", "Parser Error"),
        ("'unterminated", "Parser Error"),
        ("   ", "empty"),
    ],
)
def test_bad_sql_is_a_value_error_with_duckdbs_message(memory, clause, match):
    with pytest.raises(ValueError, match=match) as info:
        where_mask(memory, clause)
    assert clause.strip() == "" or repr(clause) in str(info.value)  # the clause is quoted


def test_a_clause_selecting_nothing_is_a_clear_error(memory):
    with pytest.raises(ValueError, match=r"where clause \"license = 'gpl'\" selects no rows"):
        where_mask(memory, "license = 'gpl'")
    with pytest.raises(ValueError, match="selects no rows"):
        where_mask(memory, "NULL")


def test_a_clause_cannot_read_files_urls_or_python_variables(memory, tmp_path):
    own = memory.root / "shards" / memory.manifest.shards[0].name / "metadata.parquet"
    (tmp_path / "ids.csv").write_text("id\n1\n2\n")
    for source in (
        "read_csv('/etc/passwd')",
        f"read_csv('{tmp_path / 'ids.csv'}')",
        "read_text('/etc/hostname')",
        "glob('/*')",
        f"read_parquet('{own}')",  # not even the memory's own files, through SQL
        "read_parquet('https://example.com/x.parquet')",
    ):
        clause = f"id IN (SELECT 1 FROM {source})"
        with pytest.raises(ValueError, match=r"reaches outside.*Permission Error") as info:
            where_mask(memory, clause)
        assert repr(clause) in str(info.value)
    # A path as a table name (a replacement scan) is not even looked up.
    with pytest.raises(ValueError, match=r"(Catalog|Permission) Error"):
        where_mask(memory, "id IN (SELECT 1 FROM '/etc/passwd')")
    # Python objects in the evaluating frame (DuckDB's replacement scans) are out of reach.
    with pytest.raises(ValueError, match="Catalog Error"):
        where_mask(memory, 'id IN (SELECT id FROM "table")')
    with pytest.raises(ValueError, match=r"(Catalog|Permission) Error"):
        where_mask(memory, "(SELECT count(*) FROM duckdb_extensions()) > 0")


def test_a_clause_cannot_write_or_run_a_second_statement(memory, tmp_path):
    out = tmp_path / "x.csv"
    separated = [
        f"1=1; COPY t TO '{out}'",
        "1=1; DROP VIEW t",
        "1=1; SELECT 42",
        f"1=1; ATTACH '{tmp_path / 'x.db'}' AS x",
        "1=1; SET enable_external_access = true",
        "1=1;",
        "license = 'mit' ; ",
    ]
    for clause in separated:
        with pytest.raises(ValueError, match=r"statement separator \(;\)"):
            where_mask(memory, clause)
    with pytest.raises(ValueError, match="closes a parenthesis it did not open"):
        where_mask(memory, "1=1) UNION ALL (SELECT 99999")
    for clause, match in [
        (f"id IN (COPY t TO '{out}')", "Parser Error"),
        (f"id IN (SELECT 1 FROM query('COPY t TO ''{out}''')) OR 1=1", "single SELECT"),
        ("id IN (SELECT 1 FROM query('DROP VIEW t')) OR 1=1", "single SELECT"),
        (f"ATTACH '{tmp_path / 'y.db'}'", "Catalog Error"),  # read as a literal of type ATTACH
    ]:
        with pytest.raises(ValueError, match=match):
            where_mask(memory, clause)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert where_mask(memory, "license = 'mit'").any()  # nothing was dropped or changed


def test_what_duckdb_does_on_the_sealed_connection(memory, tmp_path):
    """Why the checks above exist: DuckDB runs every statement of a multi-statement string, so
    a second one must be refused before it runs; the sealed connection refuses files and keeps
    its settings whatever SQL arrives."""
    import pyarrow as pa

    table = pa.table({"row": pa.array(range(5), pa.int64())})
    (tmp_path / "a.csv").write_text("x\n1\n")
    open_con = duckdb.connect(":memory:")
    assert open_con.execute(f"SELECT * FROM read_csv('{tmp_path / 'a.csv'}')").fetchall() == [(1,)]
    con = where_module._connect(duckdb, table)
    con.execute("SELECT row FROM t WHERE row = 1; DROP VIEW t")  # both ran:
    with pytest.raises(duckdb.CatalogException):
        con.execute("SELECT row FROM t")
    con = where_module._connect(duckdb, table)
    for sql in (
        f"COPY t TO '{tmp_path / 'out.csv'}'",
        f"ATTACH '{tmp_path / 'x.db'}' AS x",
        f"SELECT * FROM read_csv('{tmp_path / 'a.csv'}')",
        "INSTALL httpfs",
    ):
        with pytest.raises(duckdb.PermissionException):
            con.execute(sql)
    for sql in (
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "SET lock_configuration = false",
    ):
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute(sql)
    assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_without_duckdb_the_error_names_the_extra(memory, tmp_path):
    script = textwrap.dedent(
        """
        import sys

        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("duckdb", "_duckdb"):
                    raise ImportError(f"no module named {name!r} (hidden)")

        sys.meta_path.insert(0, Hide())
        for name in [m for m in sys.modules if m.split(".")[0] in ("duckdb", "_duckdb")]:
            del sys.modules[name]
        from reco.memory import Memory
        from reco.memory.where import where_mask

        try:
            where_mask(Memory.open(sys.argv[1]), "row = 1")
        except ImportError as e:
            print("ImportError:", e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(memory.root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout, whose reco/ has no compiled core
    )
    assert out.returncode == 0, out.stderr
    assert "ImportError:" in out.stdout and "pip install 'reco[sql]'" in out.stdout


def test_masks_are_cached_per_clause_and_version(tmp_path, monkeypatch):
    path = tmp_path / "m"
    mem = _build(path, [(40, "full"), (30, "other")], seed=5)
    calls = []
    evaluate = where_module._evaluate
    monkeypatch.setattr(where_module, "_evaluate", lambda *a: calls.append(a[2]) or evaluate(*a))
    first = where_mask(mem, "license = 'mit'")
    first[:] = True  # the caller's copy; the cache keeps its own
    second = where_mask(mem, "license = 'mit'")
    assert calls == ["license = 'mit'"]
    assert not bool(second.all()) and second.data_ptr() != first.data_ptr()
    assert torch.equal(second, where_mask(Memory.open(path), "license = 'mit'"))  # same folder
    assert len(calls) == 1
    # A new commit is a new version: the mask is evaluated again and covers the new rows.
    rng = np.random.default_rng(6)
    with MemoryWriter(path, MODS, has_labels=True) as w:
        w.add(
            {m: rng.standard_normal((25, i.dim)) for m, i in MODS.items()},
            labels=rng.integers(0, 5, 25),
            metadata=_columns(rng, 25, 70, "full"),
        )
    new = Memory.open(path)
    grown = where_mask(new, "license = 'mit'")
    assert len(calls) == 2 and grown.shape == (95,)
    assert torch.equal(grown[:70], second)
    want = [r["license"] == "mit" for r in new.metadata(range(70, 95))]
    assert grown[70:].tolist() == want
    assert where_mask(mem, "license = 'mit'").shape == (70,)  # the old version, still cached
    assert len(calls) == 2
    # The cache is bounded.
    for i in range(where_module.CACHE_ENTRIES + 8):
        where_mask(new, f"row = {i}")
    assert len(where_module._cache) == where_module.CACHE_ENTRIES


def test_ids_after_deletes_and_compaction_and_refresh(tmp_path):
    path = tmp_path / "m"
    mem = _build(path, [(30, "full"), (20, "full")], seed=7)
    before = where_mask(mem, "id >= 40")
    assert before.nonzero().squeeze(1).tolist() == list(range(40, 50))
    with MemoryWriter.open(path) as w:
        w.delete([0, 3, 41, 45])
    mem.refresh()  # a tombstone commit: a new version, the same rows (live says which)
    assert torch.equal(where_mask(mem, "id >= 40"), before)
    with MemoryWriter.open(path) as w:
        w.compact()
    mem.refresh()
    ids = mem.ids
    assert mem.rows == 46 and ids[:3].tolist() == [1, 2, 4]
    got = where_mask(mem, "id >= 40 OR id % 5 = 1")
    assert torch.equal(got, (ids >= 40) | (ids % 5 == 1))
    records = _records(mem)
    assert got.tolist() == [r["id"] >= 40 or r["id"] % 5 == 1 for r in records]
    assert torch.equal(where_mask(mem, "row = 2"), torch.arange(46) == 2)  # row != id now
    assert int(where_mask(mem, "id = 4").nonzero()) == 2


def test_search_restricted_to_the_mask_is_exact(memory):
    keys = memory.keys("text").materialize()
    torch.manual_seed(0)
    query = torch.randn(6, keys.shape[1])
    mask = where_mask(memory, "license IN ('mit', 'cc0') AND score > 0.2")
    allowed = mask.nonzero().squeeze(1)
    k = 10
    got = reco.search(query, keys[allowed], k)
    got_rows = allowed[got.indices]
    scores = query.double() @ keys.double().T
    scores[:, ~mask] = -torch.inf
    want_rows = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    assert bool(mask[got_rows].all())
    assert_topk_match(query, keys, got_rows, got.scores, want_rows, tol=1e-4)
