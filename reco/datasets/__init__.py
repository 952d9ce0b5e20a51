"""Real data that ships inside packages, and what the experiments build from it: IDX image sets
(Fashion-MNIST, MNIST), long-tailed splits, generated web-like captions."""

from .captions import (
    DIGIT_SYNONYMS,
    FASHION_SYNONYMS,
    CaptionNoise,
    generate_captions,
)
from .idx import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, load_idx_dataset, read_idx
from .longtail import exponential_profile, long_tail_split

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DIGIT_SYNONYMS",
    "FASHION_MNIST_CLASSES",
    "FASHION_SYNONYMS",
    "CaptionNoise",
    "exponential_profile",
    "generate_captions",
    "load_idx_dataset",
    "long_tail_split",
    "read_idx",
]
