"""Deprecated: reco.demo.run (this name is that module, with a warning)."""

import importlib
import sys
import warnings

warnings.warn(
    "reco.experiments.demo is deprecated: use reco.demo.run",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("reco.demo.run")
