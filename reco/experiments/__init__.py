"""Deprecated: reco.demo (`reco demo`'s experiments moved there)."""

import warnings

from ..demo import Demo, DemoConfig, LongTailParams, ZeroShotParams

warnings.warn("reco.experiments is deprecated: use reco.demo", DeprecationWarning, stacklevel=2)

__all__ = ["Demo", "DemoConfig", "LongTailParams", "ZeroShotParams"]
