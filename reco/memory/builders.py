"""Deprecated: the builders moved to reco.ingest (memory/ holds storage only). This module
re-exports reco.ingest's public names for now; import them from reco.ingest."""

import warnings

from reco import ingest as _ingest
from reco.ingest import *  # noqa: F403

warnings.warn(
    "reco.memory.builders is deprecated: import the builders from reco.ingest",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_ingest.__all__)
