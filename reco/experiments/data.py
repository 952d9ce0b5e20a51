"""Deprecated: reco.demo.data (this name is that module, with a warning)."""

import importlib
import sys
import warnings

warnings.warn(
    "reco.experiments.data is deprecated: use reco.demo.data",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("reco.demo.data")
