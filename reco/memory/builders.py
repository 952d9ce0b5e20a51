"""Deprecated: the builders moved to reco.ingest (memory/ holds storage only). This module
re-exports reco.ingest's public names for now; import them from reco.ingest."""

import warnings

from reco.ingest import (
    IMAGE_EXTENSIONS,
    MAX_CSV_FIELD,
    MAX_IMAGE_BYTES,
    MAX_LABEL_NAMES_BYTES,
    BuildReport,
    ItemSource,
    NearDuplicateFilter,
    RawItem,
    build_from_items,
    clip_retrieval_source,
    import_clip_retrieval,
    iter_caption_table,
    iter_image_folder,
    iter_webdataset,
    read_label_names,
)

warnings.warn(
    "reco.memory.builders is deprecated: import the builders from reco.ingest",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CSV_FIELD",
    "MAX_IMAGE_BYTES",
    "MAX_LABEL_NAMES_BYTES",
    "BuildReport",
    "ItemSource",
    "NearDuplicateFilter",
    "RawItem",
    "build_from_items",
    "clip_retrieval_source",
    "import_clip_retrieval",
    "iter_caption_table",
    "iter_image_folder",
    "iter_webdataset",
    "read_label_names",
]
