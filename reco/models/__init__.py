"""Models on frozen embeddings: RECO fusion, memory attention, heads, and in-forward retrieval."""

from .attention import MemoryAttention, MemoryAttentionConfig
from .fusion import RECO, FusionConfig, FusionTransformer, RECOConfig
from .heads import LinearHead, MeanKNN, MLPHead, RetrievalClassifier
from .lit import ProjectionCLIP
from .retrieval import Retrieved, Retriever

__all__ = [
    "RECO",
    "FusionConfig",
    "FusionTransformer",
    "LinearHead",
    "MLPHead",
    "MeanKNN",
    "MemoryAttention",
    "MemoryAttentionConfig",
    "ProjectionCLIP",
    "RECOConfig",
    "RetrievalClassifier",
    "Retrieved",
    "Retriever",
]
