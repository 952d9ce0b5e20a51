"""reco: retrieval-augmented recognition, exact top-k retrieval fused with attention."""

from .ops import RetrieveAttend, fused_retrieve_attend, fused_retrieve_attend_int8, quantize_keys

__version__ = "0.1.0"
__all__ = [
    "RetrieveAttend",
    "__version__",
    "fused_retrieve_attend",
    "fused_retrieve_attend_int8",
    "quantize_keys",
]
