"""The on-disk image-text memory: format, crash-safe writer, memory-mapped reader. Storage only:
nothing here imports an encoder or an op.

Builders (from images, WebDataset shards, clip-retrieval embeddings) are in reco.ingest.
"""

from .manifest import EncoderInfo, Manifest, MemoryFormatError, ModalityInfo
from .store import EmbeddingTable, Memory, MemoryLockedError, MemoryWriteError, MemoryWriter
from .where import where_mask

__all__ = [
    "EmbeddingTable",
    "EncoderInfo",
    "Manifest",
    "Memory",
    "MemoryFormatError",
    "MemoryLockedError",
    "MemoryWriteError",
    "MemoryWriter",
    "ModalityInfo",
    "where_mask",
]
