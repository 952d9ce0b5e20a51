"""Deprecated: reco.demo.longtail (this name is that module, with a warning)."""

import importlib
import sys
import warnings

warnings.warn(
    "reco.experiments.longtail is deprecated: use reco.demo.longtail",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("reco.demo.longtail")
