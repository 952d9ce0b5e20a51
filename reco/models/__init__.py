"""Models on frozen embeddings: RECO fusion, memory attention, heads, and in-forward retrieval;
`build_model`, the one factory of models from their configs."""

from .attention import MemoryAttention, MemoryAttentionConfig
from .factory import ClassifierConfig, build_model
from .fusion import RECO, FusionConfig, FusionTransformer, RECOConfig
from .heads import LinearHead, MeanKNN, MLPHead, RetrievalClassifier
from .lit import ProjectionCLIP
from .retrieval import Retrieved, Retriever

__all__ = [
    "RECO",
    "ClassifierConfig",
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
    "build_model",
]
