"""Shared fixtures."""

from __future__ import annotations

import pytest

import reco.ops

LEVELS = reco.ops._C.cpu_levels() if reco.ops._C is not None else []


@pytest.fixture(params=LEVELS or ["reference"])
def cpu_level(request, monkeypatch):
    """Runs a test once per SIMD level compiled in and supported here (RECO_CPU_LEVEL)."""
    if request.param != "reference":
        monkeypatch.setenv("RECO_CPU_LEVEL", request.param)
    return request.param
