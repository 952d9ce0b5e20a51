"""Evaluation on precomputed embeddings and logits: zero-shot logits, top-k and per-class
accuracy, long-tail (many/medium/few-shot) accuracy, retrieval recall@k, and result tables."""

from .metrics import (
    ShotBuckets,
    accuracy,
    image_text_retrieval,
    long_tail_accuracy,
    mean_per_class_accuracy,
    per_class_accuracy,
    retrieval_recall,
    zero_shot_logits,
)
from .report import compare_methods, format_table, to_markdown

__all__ = [
    "ShotBuckets",
    "accuracy",
    "compare_methods",
    "format_table",
    "image_text_retrieval",
    "long_tail_accuracy",
    "mean_per_class_accuracy",
    "per_class_accuracy",
    "retrieval_recall",
    "to_markdown",
    "zero_shot_logits",
]
