"""reco: retrieval-augmented recognition. Exact top-k retrieval fused with attention, as a torch op."""

from .ops import RetrieveAttend, fused_retrieve_attend

__version__ = "0.1.0"
__all__ = ["RetrieveAttend", "__version__", "fused_retrieve_attend"]
