"""reco.search: fused_retrieve_attend's selection without values or attention, a registered torch
op computed by the same kernels (CPU; the CUDA path through the emulation)."""

from __future__ import annotations

import pytest
import torch

import reco
import reco.ops
from reco import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _data(B, N, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g).to(dtype), torch.randn(N, d, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_exclude", [False, True])
def test_search_selects_what_the_fused_op_selects(dtype, with_exclude):
    for seed, (B, N, d, k) in enumerate([(1, 50, 8, 5), (7, 1000, 33, 16), (20, 3000, 64, 40)]):
        q, keys = _data(B, N, d, dtype, seed)
        values = torch.randn(N, 3)
        exclude = None
        if with_exclude:
            exclude = torch.randint(-1, N, (B, 9), generator=torch.Generator().manual_seed(seed))
        got = reco.search(q, keys, k, exclude=exclude)
        fused = reco.fused_retrieve_attend(q, keys, values, k, exclude=exclude)
        assert torch.equal(got.indices, fused.indices)
        assert torch.equal(got.scores, fused.scores)
        assert got.scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        want = reference.search(q.double(), keys.double(), k, exclude)[1]
        tol = 1e-5 * d**0.5 if dtype == torch.float64 else 1e-3 * d**0.5
        torch.testing.assert_close(got.scores.double(), want, atol=tol, rtol=0)


def test_search_ties_nans_and_bad_arguments():
    keys = torch.randint(-2, 3, (300, 8)).float()
    keys[150:] = keys[:150]  # exact duplicates: ties go to the lower row
    keys[7] = float("nan")
    q = torch.randint(-2, 3, (4, 8)).float()
    got = reco.search(q, keys, 300)
    assert torch.equal(got.indices, reference.search(q, keys, 300)[0])
    assert (got.indices[:, -1] == 7).all()  # the NaN row last
    with pytest.raises(ValueError, match=r"k=301 must be in \[1, N\]"):
        reco.search(q, keys, 301)
    with pytest.raises(ValueError, match=r"keys .* and query .* must have the same d"):
        reco.search(q, keys[:, :7], 3)
    with pytest.raises(TypeError, match="exclude must be int64"):
        reco.search(q, keys, 3, exclude=torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"exclude\[0, 0\] = 300 is not a row of keys"):
        reco.search(q, keys, 3, exclude=torch.full((4, 1), 300))


def test_search_gradients_through_the_selected_rows():
    q, keys = _data(5, 200, 12, torch.float64, 3)
    q.requires_grad_(True)
    keys.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: reco.search(a, b, 6).scores, (q, keys))


def test_search_opcheck_and_torch_compile():
    q, keys = _data(6, 400, 16, torch.float32, 4)
    exclude = torch.randint(-1, 400, (6, 3), generator=torch.Generator().manual_seed(5))
    torch.library.opcheck(torch.ops.reco.search.default, (q, keys, 7, exclude))
    compiled = torch.compile(lambda a, b: reco.search(a, b, 7, exclude=exclude), fullgraph=True)
    got = compiled(q, keys)
    want = reco.search(q, keys, 7, exclude=exclude)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


def test_search_meta_shapes():
    q = torch.empty(3, 10, device="meta", dtype=torch.float16)
    keys = torch.empty(100, 10, device="meta", dtype=torch.float16)
    r = reco.search(q, keys, 4)
    assert r.indices.shape == (3, 4) and r.indices.dtype == torch.int64
    assert r.scores.shape == (3, 4) and r.scores.dtype == torch.float32


@pytest.mark.emulated
@pytest.mark.skipif(reco.ops._C_emu is None, reason="reco was built without the CUDA emulation")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_cuda_path_searches_without_values(arch, dtype, monkeypatch):
    """Through the emulated CUDA path: the search kernel, then the merge kernel with no values
    (it stops after the indices and scores)."""
    q, keys = _data(3, 600, 32, dtype, 6)
    want = reco.search(q, keys, 9)  # the CPU kernel
    monkeypatch.setenv("RECO_EMULATE_CUDA", arch)
    reco.ops._C_emu.take_launch_log()
    got = reco.search(q, keys, 9)
    log = reco.ops._C_emu.take_launch_log()
    assert "search_mma_kernel" in log if dtype == torch.float16 else "search_kernel" in log
    assert "merge_attend_kernel" in log
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-6)
