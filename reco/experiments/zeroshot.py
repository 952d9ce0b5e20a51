"""Deprecated: reco.demo.zeroshot (this name is that module, with a warning)."""

import importlib
import sys
import warnings

warnings.warn(
    "reco.experiments.zeroshot is deprecated: use reco.demo.zeroshot",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("reco.demo.zeroshot")
