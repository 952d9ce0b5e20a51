"""reco: retrieval-augmented recognition, exact top-k retrieval fused with attention."""

from ._version import __version__
from .backends import build_info
from .ops import (
    RetrieveAttend,
    SearchResult,
    fused_retrieve_attend,
    fused_retrieve_attend_int8,
    quantize_keys,
    search,
)

__all__ = [
    "RetrieveAttend",
    "SearchResult",
    "__version__",
    "build_info",
    "fused_retrieve_attend",
    "fused_retrieve_attend_int8",
    "quantize_keys",
    "search",
]
