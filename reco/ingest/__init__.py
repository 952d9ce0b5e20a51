"""Building memories: from images with captions (CSV/JSONL), an ImageFolder class tree, WebDataset
tar shards (what img2dataset writes), or existing embeddings in the clip-retrieval layout.

Builds are resumable: sources are read in a fixed order, and every commit records how many source
items were consumed, so after a crash or Ctrl-C the same command continues where the last commit
left off, with nothing lost or duplicated. Every source has an identity (`ItemSource.source`, a
JSON dict recorded in the manifest: its kind, resolved paths and a fingerprint of its files), so a
memory resumes only from the source it was built from; another source is refused unless it is
appended (`append=True`), which reads it from its first item. Unreadable images (also files that
are not regular files, or larger than `max_image_bytes`) and empty or missing captions are skipped
with a count and a log line, never aborting the build; malformed sources are errors naming the
file and row.

Modules: sources (RawItem, ItemSource, bounded reads, label names), captions, folders, webdataset,
clip_retrieval (the sources), dedup (exact and near-duplicates), build (build_from_items, with
parallel decoding), merge (merge_memories), distributed (build_distributed: a part per rank,
then a merge).
"""

from .build import BuildReport, Partition, build_from_items, default_workers
from .captions import MAX_CSV_FIELD, iter_caption_table
from .clip_retrieval import clip_retrieval_source, import_clip_retrieval
from .dedup import NearDuplicateFilter
from .distributed import DistributedBuildError, build_distributed, part_folder, parts_folder
from .folders import iter_image_folder
from .merge import MergeReport, merge_memories
from .sources import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_BYTES,
    MAX_LABEL_NAMES_BYTES,
    ItemSource,
    RawItem,
    read_label_names,
)
from .webdataset import iter_webdataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CSV_FIELD",
    "MAX_IMAGE_BYTES",
    "MAX_LABEL_NAMES_BYTES",
    "BuildReport",
    "DistributedBuildError",
    "ItemSource",
    "MergeReport",
    "NearDuplicateFilter",
    "Partition",
    "RawItem",
    "build_distributed",
    "build_from_items",
    "clip_retrieval_source",
    "default_workers",
    "import_clip_retrieval",
    "iter_caption_table",
    "iter_image_folder",
    "iter_webdataset",
    "merge_memories",
    "part_folder",
    "parts_folder",
    "read_label_names",
]
