"""reco.index: every backend over tensors and multi-shard memories, against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from topk_check import assert_topk_match

import reco
from reco import reference
from reco.index import Index
from reco.memory import EncoderInfo, Memory, MemoryWriter, ModalityInfo

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """1,000 rows in 3 shards (320, 380, 300 rows), float16 image and float32 text embeddings."""
    path = tmp_path_factory.mktemp("mem") / "m"
    rng = np.random.default_rng(0)
    mods = {
        "image": ModalityInfo(24, "float16", EncoderInfo("e")),
        "text": ModalityInfo(10, "float32", EncoderInfo("e")),
    }
    with MemoryWriter(path, mods, shard_rows=300) as w:
        for n in (120, 200, 130, 250, 100, 200):
            img = rng.standard_normal((n, 24)).astype(np.float32)
            img /= np.linalg.norm(img, axis=1, keepdims=True)
            w.add({"image": img, "text": rng.standard_normal((n, 10)).astype(np.float32)})
    mem = Memory.open(path)
    assert [t.shape[0] for t in mem.keys("image").shards] == [320, 380, 300]
    return mem


def _queries(n=9, d=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


# int8 with every row of a shard as a candidate: its exact re-rank makes it exact.
EXACT = {"fused": {}, "torch": {}, "faiss": {}, "int8": {"int8_candidates": 10**6}}


@pytest.mark.parametrize("backend", sorted(EXACT))
def test_search_matches_reference_across_shards(memory, backend):
    keys = memory.keys("image").materialize()
    q = _queries()
    exclude = torch.tensor([[0, 319, 320, -1]] * 9)  # rows on both sides of a shard boundary
    exclude[3] = torch.tensor([500, 699, 700, 999])
    index = Index.from_memory(memory, "image", "text", backend=backend, **EXACT[backend])
    got = index.search(q, 17, exclude=exclude)
    want, _ = reference.search(q.double(), keys.double(), 17, exclude)
    assert_topk_match(q, keys, got.indices, got.scores, want, 1e-5, exclude)


def test_exclusions_concentrated_in_one_shard(tmp_path):
    """Shards of 15 rows; each query excludes 10 rows of a different shard; k = 20 exceeds what
    any single shard has left for that query, yet every query has plenty of rows overall."""
    rng = np.random.default_rng(7)
    mods = {"image": ModalityInfo(8, "float32", EncoderInfo("e"))}
    with MemoryWriter(tmp_path / "m", mods, shard_rows=15) as w:
        for _ in range(4):
            w.add({"image": rng.standard_normal((15, 8)).astype(np.float32)})
    mem = Memory.open(tmp_path / "m")
    keys = mem.keys("image").materialize()
    q = _queries(4, 8, seed=8)
    exclude = torch.stack([torch.arange(10) + 15 * i for i in range(4)])
    for backend in ("fused", "torch", "faiss"):
        got = Index.from_memory(mem, "image", "image", backend=backend).search(
            q, 20, exclude=exclude
        )
        want, _ = reference.search(q.double(), keys.double(), 20, exclude)
        assert_topk_match(q, keys, got.indices, got.scores, want, 1e-5, exclude)
    with pytest.raises(ValueError, match="k=51 exceeds the 50 selectable rows of query 0"):
        Index.from_memory(mem, "image", "image").search(q, 51, exclude=exclude)


def test_backends_agree(memory):
    q = _queries(seed=2)
    results = [
        Index.from_memory(memory, backend=b).search(q, 10) for b in ("fused", "torch", "faiss")
    ]
    keys = memory.keys("image").materialize()
    for r in results[1:]:
        assert_topk_match(q, keys, r.indices, r.scores, results[0].indices, 1e-5)


def test_retrieve_attend_over_shards_matches_the_op_on_one_tensor(memory):
    import reco

    q = _queries(seed=3)
    aq = torch.randn(9, 2, 10, generator=torch.Generator().manual_seed(4))
    keys, values = memory.keys("image").materialize(), memory.values("text").materialize()
    want = reco.fused_retrieve_attend(q, keys, values, 8, attn_query=aq, temperature=0.2)
    for backend, kwargs in EXACT.items():
        got = Index.from_memory(memory, backend=backend, **kwargs).retrieve_attend(
            q, 8, attn_query=aq, temperature=0.2
        )
        assert torch.equal(got.indices, want.indices), backend
        torch.testing.assert_close(got.output, want.output, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.weights, want.weights, atol=1e-5, rtol=1e-5)


def test_single_tensor_index_uses_the_op_and_keeps_gradients():
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(500, 8, generator=g), torch.randn(500, 3, generator=g)
    q = torch.randn(4, 8, generator=g, requires_grad=True)
    out = Index(keys, values).retrieve_attend(q, 5).output
    out.sum().backward()
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    ("factory", "params", "min_recall"),
    [("IVF16,Flat", "nprobe=16", 1.0), ("HNSW16", "efSearch=128", 0.95), ("PQ4", None, 0.2)],
)
def test_approximate_faiss_indexes_return_good_neighbours(memory, factory, params, min_recall):
    q = _queries(seed=6)
    exact = Index.from_memory(memory).search(q, 10).indices
    index = Index.from_memory(memory, backend="faiss", faiss_factory=factory, faiss_params=params)
    got = index.search(q, 10)
    assert got.indices.shape == (9, 10)
    pairs = zip(got.indices.tolist(), exact.tolist())
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in pairs])
    assert recall >= min_recall, recall


def test_int8_backend_with_default_candidates_finds_the_neighbours(memory):
    """Approximate: 4k candidates per shard from the int8 codes, re-ranked exactly. Over a
    single tensor too, where retrieve_attend goes straight to the int8 op."""
    q = _queries(seed=8)
    exact = Index.from_memory(memory).search(q, 10)
    got = Index.from_memory(memory, backend="int8").search(q, 10)
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(got.indices.tolist(), exact.indices.tolist())]
    )
    assert recall >= 0.98, recall
    keys = memory.keys("image").materialize()
    values = memory.values("text").materialize()
    one = Index(keys, values, backend="int8", int8_candidates=40).retrieve_attend(q, 10)
    want = Index(keys, values).retrieve_attend(q, 10)
    assert torch.equal(one.indices, want.indices)
    torch.testing.assert_close(one.output, want.output, atol=1e-5, rtol=1e-5)


def test_bad_arguments(memory):
    with pytest.raises(ValueError, match="backend must be one of"):
        Index.from_memory(memory, backend="annoy")
    with pytest.raises(ValueError, match="int8_candidates"):
        Index.from_memory(memory, backend="int8", int8_candidates=0)
    with pytest.raises(ValueError, match="not a valid faiss factory"):
        Index.from_memory(memory, backend="faiss", faiss_factory="Nonsense99")
    with pytest.raises(ValueError, match="do not apply"):
        Index.from_memory(memory, backend="faiss", faiss_factory="Flat", faiss_params="bogus=3")
    index = Index.from_memory(memory)
    with pytest.raises(ValueError, match=r"query must be \[B, 24\]"):
        index.search(torch.randn(2, 23), 3)
    with pytest.raises(ValueError, match=r"k=0 must be an int in \[1, 1000\]"):
        index.search(torch.randn(2, 24), 0)
    with pytest.raises(ValueError, match="keys have 1000 rows but values 5"):
        Index(memory.keys("image"), torch.randn(5, 3))
    with pytest.raises(KeyError, match="no 'audio' embeddings"):
        memory.keys("audio")


@pytest.mark.parametrize("backend", sorted(EXACT))
@pytest.mark.parametrize("bad", [1000, 1001, 5000, -2, -7])
def test_out_of_range_exclude_raises_the_ops_error(memory, backend, bad):
    """Rows >= N or < -1 in exclude: the same ValueError as the op, over shards or one tensor."""
    keys, values = memory.keys("image").materialize(), memory.values("text").materialize()
    g = torch.Generator().manual_seed(bad % 97)
    q = _queries(seed=9)
    exclude = torch.randint(-1, 1000, (9, 6), generator=g)
    exclude[int(torch.randint(9, (1,), generator=g)), int(torch.randint(6, (1,), generator=g))] = (
        bad
    )
    exclude[8, 5] = bad  # a second bad value: the message names the first, as the op does
    with pytest.raises(ValueError) as want:
        reco.fused_retrieve_attend(q, keys, values, 5, exclude=exclude)
    indexes = [
        Index.from_memory(memory, backend=backend, **EXACT[backend]),
        Index(keys, values, backend=backend, **EXACT[backend]),
    ]
    for index in indexes:
        with pytest.raises(ValueError) as got:
            index.search(q, 5, exclude=exclude)
        assert str(got.value) == str(want.value)
        with pytest.raises(ValueError) as got:
            index.retrieve_attend(q, 5, exclude=exclude)
        assert str(got.value) == str(want.value)
        with pytest.raises(ValueError) as got:
            index.search_candidates(q, 5, exclude=exclude)
        assert str(got.value) == str(want.value)
