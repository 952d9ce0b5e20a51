"""Deprecated: the experiment config is reco.train.config, build is reco.train.run."""

import warnings

from .config import DataConfig, ExperimentConfig, LongTailConfig, ZeroShotConfig, load_experiment
from .run import Built, build

warnings.warn(
    "reco.train.experiment is deprecated: use reco.train.config (the experiment config) and "
    "reco.train.run (build, train)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "Built",
    "DataConfig",
    "ExperimentConfig",
    "LongTailConfig",
    "ZeroShotConfig",
    "build",
    "load_experiment",
]
