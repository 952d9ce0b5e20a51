"""The CUDA launch path (reco/ops.py, csrc/bindings.cpp, the host code of csrc/cuda) run through
the CUDA emulation (reco._C_emu, RECO_EMULATE_CUDA): one test per defect found by review (F1-F8),
each failing before its fix, plus DLPack producers other than torch."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from topk_check import assert_topk_match

import reco
import reco.backends.cuda
import reco.ops
from reco import reference

_EMU = reco.ops._C_emu
pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(_EMU is None, reason="reco was built without the CUDA emulation (_C_emu)"),
]
ARCHS = ["sm_90", "sm_80"]


@pytest.fixture(params=ARCHS)
def arch(request, monkeypatch):
    monkeypatch.setenv("RECO_EMULATE_CUDA", request.param)
    _EMU.take_launch_log()  # forget earlier launches
    return request.param


def _launched() -> str:
    return _EMU.take_launch_log()


def _want(q, keys, values, k, **kw):
    """The float64 reference (the CUDA path never takes float64 inputs)."""
    kw = {n: (v.double() if n == "attn_query" and v is not None else v) for n, v in kw.items()}
    return reference.fused_retrieve_attend(q.double(), keys.double(), values.double(), k, **kw)


def _check(got, q, keys, values, k, **kw):
    want = _want(q, keys, values, k, **kw)
    tol = 1e-4 * q.shape[1] ** 0.5
    assert_topk_match(q, keys, got.indices, got.scores.double(), want.indices, tol)
    same = (got.indices == want.indices).all(1)
    torch.testing.assert_close(got.output[same].double(), want.output[same], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.weights[same].double(), want.weights[same], rtol=1e-4, atol=1e-6)


# ---- F1: the strides of size-1 dims ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_one_row_view_of_a_longer_tensor_is_a_valid_query(arch, dtype):
    """h[:, -1] of a [1, T, d] tensor: [1, d] with row stride T * d, which torch calls contiguous;
    the binding used to reject it (and, on torch 1.13 to 2.9, every B = 1 call)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 7, 48, generator=g).to(dtype)
    keys = torch.randn(300, 48, generator=g).to(dtype)
    values = torch.randn(300, 8, generator=g)
    q = h[:, -1]
    assert q.stride() == (7 * 48, 1) and q.is_contiguous()
    got = reco.fused_retrieve_attend(q, keys, values, 5)
    log = _launched()
    assert "search_mma_kernel" in log if dtype == torch.float16 else "search_kernel" in log, log
    _check(got, q, keys, values, 5)


def test_size_one_dims_may_have_any_stride_in_the_binding(arch):
    """A producer that exports stride 1 (or anything) for a size-1 dim, as torch 1.13 to 2.9
    does: numpy views with such strides reach the binding unchanged."""
    g = np.random.default_rng(2)
    d, N, k = 32, 300, 4
    q = np.lib.stride_tricks.as_strided(g.standard_normal(d).astype(np.float32), (1, d), (4, 4))
    keys = g.standard_normal((N, d)).astype(np.float32)
    values = g.standard_normal((N, 1)).astype(np.float32)
    values = np.lib.stride_tricks.as_strided(values, (N, 1), (4, 4 * 777))  # dv = 1: any stride
    out = _run_binding(q, keys, values, k, plan=_plan(1, N, d, k, 0))
    want = reference.fused_retrieve_attend(
        torch.from_numpy(np.ascontiguousarray(q)).double(),
        torch.from_numpy(keys).double(),
        torch.from_numpy(np.ascontiguousarray(values)).double(),
        k,
    )
    assert np.array_equal(out["indices"], want.indices.numpy())
    np.testing.assert_allclose(out["output"], want.output.numpy(), rtol=1e-5, atol=1e-6)


# ---- F2: the stream ---------------------------------------------------------------------------


class _Recorder:
    """A DLPack producer that records the keywords its __dlpack__ is called with."""

    def __init__(self, t: torch.Tensor, calls: list):
        self.t, self.calls = t, calls

    def __dlpack__(self, **kwargs):
        self.calls.append(kwargs)
        return self.t.__dlpack__()

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


@pytest.mark.parametrize("stream, told", [(None, None), (0, 1), (0x7F00DEAD, 0x7F00DEAD)])
def test_every_array_is_exported_for_the_launch_stream(arch, stream, told):
    """__dlpack__(stream=...) names the stream the kernels run on (DLPack's 1 for the legacy
    default stream, None for host arrays): torch 2.8 takes a missing stream to mean the legacy
    default stream and orders it with an event, which breaks CUDA graph capture on a side stream.
    In the emulation the stream is never dereferenced, so any handle can be given."""
    calls: list = []
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 16, generator=g)
    keys = torch.randn(300, 16, generator=g)
    values = torch.randn(300, 4, generator=g)
    out = _run_binding(q, keys, values, 3, plan=_plan(2, 300, 16, 3, 0), stream=stream,
                       wrap=lambda t: _Recorder(t, calls))  # fmt: skip
    assert len(calls) == 9  # query, keys, values, the 4 outputs and the workspace's 2 arrays
    assert all(c == {"stream": told} for c in calls), calls
    assert torch.equal(torch.from_numpy(out["indices"]), _want(q, keys, values, 3).indices)


# ---- F3: the 48 KB default counts static shared memory ----------------------------------------


@pytest.mark.parametrize("B, d", [(7, 216), (6, 508), (4, 1530)])
def test_dynamic_shared_memory_just_under_48_kb(arch, B, d):
    """The CUDA-core search's dynamic shared memory is 49,057-49,152 B here; with its 96 static
    bytes it is over the 48 KB a launch may take without the opt-in, which used to be skipped."""
    g = torch.Generator().manual_seed(B)
    q = torch.randn(B, d, generator=g)
    keys = torch.randn(260, d, generator=g)
    values = torch.randn(260, 4, generator=g)
    assert _plan(B, 260, d, 3, 0)[2] == B  # one block of B queries
    dynamic = B * 2 * 256 * 12 + B * d * 4 + B * 4
    assert 49_057 <= dynamic <= 48 * 1024
    got = reco.fused_retrieve_attend(q, keys, values, 3)
    assert "search_kernel" in _launched()
    _check(got, q, keys, values, 3)


# ---- F4: the caller's current device -----------------------------------------------------------


def test_planning_and_launching_leave_the_current_device_alone(arch):
    g = torch.Generator().manual_seed(4)
    q, keys, values = torch.randn(2, 16, generator=g), torch.randn(300, 16), torch.randn(300, 4)
    try:
        _EMU.set_device(0)
        _EMU.cuda_plan(2, 300, 16, 3, 0, 1)  # device 1 is named, not made current
        assert _EMU.get_device() == 0
        _EMU.set_device(1)
        got = reco.fused_retrieve_attend(q, keys, values, 3)  # runs on device 0 (host arrays)
        assert _EMU.get_device() == 1
        assert torch.equal(got.indices, _want(q, keys, values, 3).indices)
    finally:
        _EMU.set_device(0)


# ---- F5: a tensor-core plan that fits each architecture ----------------------------------------


@pytest.mark.parametrize(
    "dtype, terms, stages",
    [(torch.bfloat16, 3, {"sm_90": 3, "sm_80": 2}), (torch.float16, 2, {"sm_90": 3, "sm_80": 3})],
)
def test_float32_queries_take_tensor_cores_on_both_gpus(arch, dtype, terms, stages):
    """Three bfloat16 terms need 173,056 + 768 B of shared memory with 3 pipeline stages, over
    A100's 166,912 B: there the search runs with 2 stages instead of falling back to CUDA cores."""
    B, N, d, k = 12, 600, 64, 8
    assert _plan(B, N, d, k, terms)[3]  # mma
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, d, generator=g)
    keys = torch.randn(N, d, generator=g).to(dtype)
    values = torch.randn(N, 8, generator=g)
    got = reco.fused_retrieve_attend(q, keys, values, k)
    log = _launched()
    assert f"kTerms = {terms}; int kStages = {stages[arch]}" in log, log
    want = _want(q, keys, values, k)
    tol = 1e-5 * float((q.abs().double() @ keys.abs().double().T).max())
    assert_topk_match(q, keys, got.indices, got.scores.double(), want.indices, tol)


# ---- F6: a huge k ------------------------------------------------------------------------------


def test_a_huge_k_is_refused_at_once(tmp_path):
    """k > 2^30 used to overflow int in planning and loop forever: a ValueError now, checked in a
    child process so that a hang fails instead of blocking the suite."""
    code = (
        "import reco._C_emu as e\n"
        "for k in (2**30 + 1, 2**31 + 5, 2**40, 0, -3, 2**20 + 1):\n"
        "    try:\n"
        "        e.cuda_plan(4, 2**41, 64, k, 0, 0)\n"
        "    except ValueError as err:\n"
        "        assert 'must be in [1, 1048576]' in str(err), err\n"
        "    else:\n"
        "        raise SystemExit(f'k={k} was accepted')\n"
        "print(e.cuda_plan(4, 2**41, 64, 2**20, 0, 0)[0])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "False"  # the largest k plans, and is too large for shared memory


def test_a_k_beyond_the_kernel_falls_back_to_the_cpu_kernel(arch):
    assert reco.backends.cuda.plan(_EMU, torch.zeros(1, 4), 2**21, 2**20 + 1, 0) is None


# ---- F7: infinite query entries -----------------------------------------------------------------


def test_float16_terms_of_a_query_with_an_infinity():
    """The scale comes from the largest finite magnitude: an inf entry used to pick 2^14, and
    entries with |x| >= 4 then overflowed float16 into more infinities."""
    q = torch.randn(3, 32) * 8
    q[0, 3] = float("inf")
    q[1, 7] = float("-inf")
    terms = reco.ops.query_terms(q, torch.float16).double()
    total = terms.sum(0)
    for b in range(3):
        finite = torch.isfinite(q[b])
        amax = float(q[b][finite].abs().max())
        scale = 2.0 ** (15 - torch.frexp(torch.tensor(amax)).exponent.item())
        assert torch.isfinite(total[b][finite]).all()
        err = (total[b][finite] / scale - q[b][finite].double()).abs()
        assert float(err.max()) <= 2**-22 * amax
    assert total[0, 3] == float("inf") and total[1, 7] == float("-inf")


def test_an_infinite_query_entry_selects_as_float_arithmetic_does(arch):
    """The contract's answer for a query with an infinite entry: each score is +-inf by the sign
    of the key's element (ties of +inf go to the lower rows)."""
    B, N, d, k = 12, 400, 32, 6  # B > 8: the float32 query is split into float16 terms
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, d, generator=g) * 8
    q[:, 5] = float("inf")
    keys = torch.randn(N, d, generator=g).half()
    keys[keys == 0] = 0.5
    values = torch.randn(N, 4, generator=g)
    assert _plan(B, N, d, k, 2)[3]
    got = reco.fused_retrieve_attend(q, keys, values, k)
    assert "kTerms = 2" in _launched()
    positive = torch.nonzero(keys[:, 5] > 0).flatten()[:k]
    assert torch.equal(got.indices, positive.expand(B, k))
    assert (got.scores == float("inf")).all()
    want = _want(q, keys, values, k)
    assert torch.equal(got.indices, want.indices)


# ---- F8: the binding checks what it is given ----------------------------------------------------


def _plan(B, N, d, k, terms):
    ok, splits, pow2, queries, mma = _EMU.cuda_plan(B, N, d, k, terms, 0)
    assert ok
    return splits, pow2, queries, mma


def _run_binding(q, keys, values, k, *, plan, candidates=None, stream=None, wrap=None,
                 terms=None, outputs=None, workspace=None):  # fmt: skip
    """_C_emu.retrieve_attend_cuda on host arrays (torch or numpy), returning the outputs."""
    B, dv = q.shape[0], values.shape[1]
    candidates = k if candidates is None else candidates
    splits = plan[0]
    if outputs is None:
        outputs = {
            "output": np.zeros((B, 1, dv), np.float32),
            "weights": np.zeros((B, 1, k), np.float32),
            "indices": np.zeros((B, k), np.int64),
            "scores": np.zeros((B, k), np.float32),
        }
    if workspace is None:
        workspace = (np.zeros((B, splits, candidates), np.float32),
                     np.zeros((B, splits, candidates), np.int64))  # fmt: skip

    def as_arg(t):
        return t if t is None or wrap is None else wrap(torch.as_tensor(t))

    _EMU.retrieve_attend_cuda(
        as_arg(q), as_arg(terms), None, None, as_arg(keys), as_arg(values), None, None, None, k,
        candidates, 1.0, *(as_arg(outputs[n]) for n in ("output", "weights", "indices", "scores")),
        *(as_arg(w) for w in workspace), *plan, stream,
    )  # fmt: skip
    return outputs


def _small():
    g = torch.Generator().manual_seed(8)
    return torch.randn(3, 16, generator=g), torch.randn(300, 16, generator=g), torch.randn(300, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: (p[0] + 1, *p[1:]), "workspace must be contiguous [B, splits, candidates]"),
        (lambda p: (0, *p[1:]), "splits must be in [1, 65535]"),
        (lambda p: (p[0], 384, *p[2:]), "pow2 must be a power of two >= 256"),
        (lambda p: (p[0], 128, *p[2:]), "pow2 must be a power of two >= 256"),
        (lambda p: (p[0], p[1], 0, p[3]), "queries must be in [1, 8]"),
        (lambda p: (p[0], p[1], 9, p[3]), "queries must be in [1, 8]"),
        (lambda p: (p[0], 1 << 14, *p[2:]), "need more shared memory than this GPU has"),
    ],
)
def test_a_plan_that_does_not_match_the_call_is_refused(arch, change, message):
    q, keys, values = _small()
    plan = _plan(3, 300, 16, 4, 0)
    bad = change(plan)
    workspace = None
    if bad[0] != plan[0]:  # a workspace sized for the original plan
        workspace = (np.zeros((3, plan[0], 4), np.float32), np.zeros((3, plan[0], 4), np.int64))
    with pytest.raises(ValueError, match=re.escape(message)):
        _run_binding(q, keys, values, 4, plan=bad, workspace=workspace)


def test_candidates_beyond_the_pow2_buffer_or_the_tensor_core_list_are_refused(arch):
    q, keys, values = _small()
    splits, _, queries, _ = _plan(3, 300, 16, 4, 0)
    with pytest.raises(ValueError, match="pow2 must be a power of two >= 256 and >= candidates"):
        _run_binding(q, keys, values, 4, plan=(splits, 256, queries, False), candidates=290)
    terms = q.half()[None].contiguous()
    with pytest.raises(ValueError, match="the tensor-core search keeps at most 64 candidates"):
        _run_binding(q, keys.half(), values, 4, plan=(splits, 256, queries, True), candidates=65,
                     terms=terms)  # fmt: skip


@pytest.mark.parametrize(
    "name, shape, dtype",
    [
        ("output", (3, 1, 5), np.float32),
        ("weights", (3, 2, 4), np.float32),
        ("indices", (3, 5), np.int64),
        ("scores", (2, 4), np.float32),
    ],
)
def test_outputs_of_the_wrong_shape_or_dtype_are_refused(arch, name, shape, dtype):
    """The kernels index the outputs by the call's shapes: a smaller array used to be written
    out of bounds."""
    q, keys, values = _small()
    outputs = {
        "output": np.zeros((3, 1, 4), np.float32),
        "weights": np.zeros((3, 1, 4), np.float32),
        "indices": np.zeros((3, 4), np.int64),
        "scores": np.zeros((3, 4), np.float32),
    }
    outputs[name] = np.zeros(shape, dtype)
    with pytest.raises(ValueError, match=r"output \[B, H, dv\], weights \[B, H, k\]"):
        _run_binding(q, keys, values, 4, plan=_plan(3, 300, 16, 4, 0), outputs=outputs)


# ---- DLPack producers ----------------------------------------------------------------------------


def test_numpy_arrays_give_the_results_of_torch_tensors(arch):
    """The binding takes any DLPack producer: numpy float32 and float16 arrays (cupy needs a GPU,
    see the README)."""
    g = np.random.default_rng(9)
    q = g.standard_normal((3, 24)).astype(np.float32)
    keys = g.standard_normal((300, 24)).astype(np.float16)
    values = g.standard_normal((300, 5)).astype(np.float32)
    plan = _plan(3, 300, 24, 6, 0)
    from_numpy = _run_binding(q, keys, values, 6, plan=plan)
    got = reco.fused_retrieve_attend(torch.from_numpy(q), torch.from_numpy(keys),
                                     torch.from_numpy(values), 6)  # fmt: skip
    assert np.array_equal(from_numpy["indices"], got.indices.numpy())
    assert np.array_equal(from_numpy["output"], got.output.numpy())
