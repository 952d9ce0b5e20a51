"""Deprecated: reco.demo.report (this name is that module, with a warning)."""

import importlib
import sys
import warnings

warnings.warn(
    "reco.experiments.report is deprecated: use reco.demo.report",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("reco.demo.report")
