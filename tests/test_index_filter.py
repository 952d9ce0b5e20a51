"""Index.search with filters: allow masks, SQL where clauses over a memory's metadata, its deleted
rows; results carry stable ids; an index holds its memory's version until refresh(). Every
backend against a float64 brute force over the rows left."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from topk_check import assert_topk_match

from reco.index import Index
from reco.memory import EncoderInfo, Memory, MemoryWriter, ModalityInfo

LICENSES = ["cc-by", "cc0", "proprietary"]


def build(root, shards=4, rows=40, d=16, seed=0):
    """A memory of `shards` shards; metadata: license and year per row. Returns the metadata
    written, in row order."""
    rng = np.random.default_rng(seed)
    mods = {"image": ModalityInfo(d, "float32", EncoderInfo("e"))}
    meta = []
    with MemoryWriter(root, mods, shard_rows=rows) as w:
        for _ in range(shards):
            lic = [LICENSES[i] for i in rng.integers(0, 3, rows)]
            year = rng.integers(2000, 2024, rows).tolist()
            w.add(
                {"image": rng.standard_normal((rows, d)).astype(np.float32)},
                metadata={"license": lic, "year": year},
            )
            meta += [{"license": a, "year": b} for a, b in zip(lic, year)]
    return meta


def oracle(q, keys, k, allow, exclude=None):
    s = q.double() @ keys.double().T
    s[:, ~allow] = -torch.inf
    if exclude is not None:
        for b in range(q.shape[0]):
            e = exclude[b][exclude[b] >= 0]
            s[b, e] = -torch.inf
    return s.topk(k, dim=1).indices


BACKENDS = [
    ("fused", {}),
    ("torch", {}),
    ("faiss", {}),
    ("int8", {"int8_candidates": 160}),  # every row re-ranked: exact
]


@pytest.mark.parametrize("backend, kwargs", BACKENDS)
def test_allow_and_where_on_every_backend(tmp_path, backend, kwargs):
    if backend == "faiss":
        pytest.importorskip("faiss")
    meta = build(tmp_path / "m")
    mem = Memory.open(tmp_path / "m")
    keys = mem.keys("image").materialize()
    index = Index.from_memory(mem, "image", "image", backend=backend, **kwargs)
    q = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for frac in (0.5, 0.1):
        allow = torch.rand(mem.rows, generator=g) < frac
        got = index.search(q, 4, allow=allow)
        assert bool(allow[got.indices].all())
        assert_topk_match(q, keys, got.indices, got.scores, oracle(q, keys, 4, allow), 1e-4)
    where = "license = 'cc0' AND year >= 2010"
    allow = torch.tensor([m["license"] == "cc0" and m["year"] >= 2010 for m in meta])
    ex = torch.tensor([[int(allow.nonzero()[0]), -1]] * 5)  # the first allowed row, excluded
    got = index.search(q, 6, where=where, exclude=ex)
    assert_topk_match(q, keys, got.indices, got.scores, oracle(q, keys, 6, allow, ex), 1e-4, ex)
    assert torch.equal(got.ids, mem.ids[got.indices])
    # where and allow combine
    half = torch.arange(mem.rows) % 2 == 0
    got = index.search(q, 3, where=where, allow=half)
    assert bool((allow & half)[got.indices].all())
    count = int((allow & half).sum())
    with pytest.raises(ValueError, match=f"k={count + 1} exceeds the {count} selectable rows"):
        index.search(q, count + 1, where=where, allow=half)


def test_deleted_rows_are_never_returned_and_ids_are_stable(tmp_path):
    build(tmp_path / "m", shards=2, rows=30)
    mem = Memory.open(tmp_path / "m")
    keys = mem.keys("image").materialize()
    q = keys[[3, 40, 41]] * 10  # each query's best row is itself
    index = Index.from_memory(mem, "image", "image")
    assert index.search(q, 1).ids[:, 0].tolist() == mem.ids[[3, 40, 41]].tolist()
    with MemoryWriter.open(tmp_path / "m") as w:
        w.delete(mem.ids[[3, 41]].tolist())
    # the index holds its version until refresh
    assert index.search(q, 1).indices[:, 0].tolist() == [3, 40, 41]
    assert index.refresh()
    live = index.memory.live
    assert int((~live).sum()) == 2
    got = index.search(q, 5)
    assert bool(live[got.indices].all())
    assert got.ids[1, 0] == mem.ids[40]
    want_ids = mem.ids  # of the old version: rows and ids still agree before a compaction
    with MemoryWriter.open(tmp_path / "m") as w:
        w.compact()
    assert index.refresh()
    got = index.search(q, 1)
    assert index.memory.rows == 58
    # after compaction rows shift past the deleted ones, ids do not
    assert got.ids[1, 0] == want_ids[40] and got.indices[1, 0] == 39
    assert not index.refresh()


def test_retrieve_attend_with_where_and_a_single_shard(tmp_path):
    meta = build(tmp_path / "m", shards=1, rows=200)
    mem = Memory.open(tmp_path / "m")
    keys = mem.keys("image").materialize()
    q = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    r = Index.from_memory(mem, "image", "image").retrieve_attend(q, 4, where="year < 2005")
    allow = torch.tensor([m["year"] < 2005 for m in meta])
    assert torch.equal(r.indices, oracle(q, keys, 4, allow))


def test_filter_errors(tmp_path):
    keys = torch.randn(50, 8)
    index = Index(keys)
    q = torch.randn(2, 8)
    with pytest.raises(ValueError, match="where= needs an index over a memory"):
        index.search(q, 3, where="year > 1")
    with pytest.raises(TypeError, match="allow must be bool"):
        index.search(q, 3, allow=torch.ones(50, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"allow must be \[N\] with N=50"):
        index.search(q, 3, allow=torch.ones(49, dtype=torch.bool))
    allow = torch.zeros(50, dtype=torch.bool)
    allow[:2] = True
    with pytest.raises(ValueError, match="k=3 exceeds the 2 selectable rows"):
        index.search(q, 3, allow=allow)
    base = Index(keys, allow=torch.arange(50) >= 25, ids=torch.arange(50) * 10)
    got = base.search(q, 3)
    assert bool((got.indices >= 25).all()) and torch.equal(got.ids, got.indices * 10)
    build(tmp_path / "m", shards=1, rows=10)
    mem = Memory.open(tmp_path / "m")
    with pytest.raises(ValueError, match="selects no rows"):
        Index.from_memory(mem, "image", "image").search(torch.randn(1, 16), 1, where="year < 0")
