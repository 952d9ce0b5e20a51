"""Evaluation metrics on precomputed embeddings, logits and predictions (pure torch).

Conventions shared by every function here:

- Ties are broken by index, lower first, as ``torch.sort(..., descending=True, stable=True)``
  would order them, so results never depend on how a backend's ``topk`` happens to order equal
  scores.
- Accuracies and recalls are fractions in [0, 1]; NaN marks a quantity with no samples.
- Similarities are computed in float32, or float64 when an input is float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor

# A single positive per query (Tensor [N] or [N, P]) or a collection of positives per query.
Positives = Tensor | Sequence[Iterable[int]]


# ---------------------------------------------------------------- input checks


def _check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(x: object, name: str, dims: tuple[int, ...]) -> Tensor:
    x = _check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")
    return x


def _check_int(x: object, name: str, dims: tuple[int, ...] = (1,)) -> Tensor:
    x = _check_tensor(x, name)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int64), got {x.dtype}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x.long()


def _check_range(x: Tensor, name: str, high: int, what: str) -> None:
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
        raise ValueError(
            f"{name} must lie in [0, {high}) ({what}), got values in "
            f"[{int(x.min())}, {int(x.max())}]"
        )


def _check_ks(ks: object, name: str) -> tuple[int, ...]:
    if isinstance(ks, Integral):
        ks = (ks,)
    if not isinstance(ks, Iterable):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(ks).__name__}")
    ks = tuple(ks)
    if not ks or any(not isinstance(k, Integral) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"{name} must be a non-empty sequence of ints >= 1, got {ks}")
    return tuple(int(k) for k in ks)


def _check_same_length(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same length, got {a.shape[0]} and {b.shape[0]}"
        )


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    # Half/bfloat16 embeddings are compared in float32: their rounding would create spurious ties.
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# ---------------------------------------------------------------- classification


def zero_shot_logits(image_emb: Tensor, class_text_emb: Tensor) -> Tensor:
    """Cosine logits [N, C] (float32, or float64 for float64 inputs) between image embeddings
    [N, d] and class text embeddings [C, d] or [C, P, d] (P prompt templates per class).

    With a prompt dimension the class embedding is CLIP's prompt ensemble: the mean of the
    L2-normalised prompt embeddings, re-normalised. No logit scale is applied (argmax and
    accuracy do not depend on it). A zero vector gets cosine 0 with everything.
    """
    image_emb = _check_float(image_emb, "image_emb", (2,))
    class_text_emb = _check_float(class_text_emb, "class_text_emb", (2, 3))
    if class_text_emb.shape[-1] != image_emb.shape[1]:
        raise ValueError(
            f"class_text_emb must have the embedding size of image_emb ({image_emb.shape[1]}), "
            f"got shape {tuple(class_text_emb.shape)}"
        )
    if class_text_emb.shape[0] == 0 or (class_text_emb.dim() == 3 and class_text_emb.shape[1] == 0):
        raise ValueError(
            f"class_text_emb must have >= 1 class and >= 1 prompt, "
            f"got shape {tuple(class_text_emb.shape)}"
        )
    dtype = _compute_dtype(image_emb, class_text_emb)
    classes = F.normalize(class_text_emb.to(dtype), dim=-1)
    if classes.dim() == 3:
        # Normalising each prompt first gives every template the same weight in the mean.
        classes = F.normalize(classes.mean(dim=1), dim=-1)
    images = F.normalize(image_emb.to(dtype), dim=-1)
    return images @ classes.to(images.device).T


def _true_class_rank(logits: Tensor, labels: Tensor) -> Tensor:
    """0-based rank [N] int64 of each sample's true class under a stable descending sort."""
    true = logits.gather(1, labels[:, None])
    cols = torch.arange(logits.shape[1], device=logits.device)
    above = (logits > true).sum(1)
    tied_before = ((logits == true) & (cols < labels[:, None])).sum(1)
    return above + tied_before


def accuracy(logits: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies of logits [N, C] (floating) against labels [N] (int64), as fractions:
    {"top1": ..., "top5": ...}.

    A k larger than C is clipped to C (so it is 1.0) but keeps its requested key. Ties are
    broken deterministically by class index: among equal logits the lower class index ranks
    first, i.e. the order of ``torch.sort(logits, descending=True, stable=True)``.
    """
    logits = _check_float(logits, "logits", (2,))
    labels = _check_int(labels, "labels").to(logits.device)
    _check_same_length(logits, labels, "logits", "labels")
    n, c = logits.shape
    if n == 0 or c == 0:
        raise ValueError(f"logits must be [N >= 1, C >= 1], got shape {tuple(logits.shape)}")
    _check_range(labels, "labels", c, "class indices of logits")
    topk = _check_ks(topk, "topk")
    rank = _true_class_rank(logits, labels)
    return {f"top{k}": (rank < min(k, c)).double().mean().item() for k in topk}


def _check_predictions(
    predictions: object, labels: object, num_classes: int
) -> tuple[Tensor, Tensor]:
    if not isinstance(num_classes, Integral) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    predictions = _check_tensor(predictions, "predictions")
    if predictions.dim() == 2 and predictions.is_floating_point():
        raise ValueError(
            f"predictions must be class indices [N], got {predictions.dtype} scores of shape "
            f"{tuple(predictions.shape)} (take logits.argmax(1) first)"
        )
    predictions = _check_int(predictions, "predictions")
    labels = _check_int(labels, "labels").to(predictions.device)
    _check_same_length(predictions, labels, "predictions", "labels")
    if predictions.shape[0] == 0:
        raise ValueError("predictions and labels must hold >= 1 sample, got 0")
    _check_range(predictions, "predictions", int(num_classes), "class indices")
    _check_range(labels, "labels", int(num_classes), "class indices")
    return predictions, labels


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Accuracy of each class [C] float64 from predicted and true class indices [N] (int64):
    the fraction of samples of class c predicted as c; NaN for a class absent from labels."""
    predictions, labels = _check_predictions(predictions, labels, num_classes)
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    # 0/0 gives NaN, which is what an absent class should read as.
    return (correct / total).cpu()


def mean_per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over the classes present in labels [N] of per_class_accuracy (a float; classes
    absent from labels are skipped, not counted as 0)."""
    return per_class_accuracy(predictions, labels, num_classes).nanmean().item()


# ---------------------------------------------------------------- long tail

BUCKETS = ("many", "medium", "few")


@dataclass(frozen=True)
class ShotBuckets:
    """Long-tail split of classes by training-set size (the ImageNet-LT / Places-LT convention):
    many-shot: count > many_above; medium-shot: few_below <= count <= many_above;
    few-shot: count < few_below."""

    many_above: int = 100
    few_below: int = 20

    def __post_init__(self) -> None:
        for name in ("many_above", "few_below"):
            v = getattr(self, name)
            if not isinstance(v, Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.few_below > self.many_above + 1:
            raise ValueError(
                f"few_below must be <= many_above + 1, got few_below={self.few_below}, "
                f"many_above={self.many_above}"
            )

    def bucket_of(self, train_counts: Tensor) -> list[str]:
        """The bucket name ("many", "medium" or "few") of each class, from its number of
        training images train_counts [C] (integer)."""
        counts = _check_int(train_counts, "train_counts")
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError(f"train_counts must be >= 0, got min {int(counts.min())}")
        return [BUCKETS[i] for i in self._bucket_ids(counts).tolist()]

    def _bucket_ids(self, counts: Tensor) -> Tensor:
        ids = torch.ones_like(counts)  # medium
        ids[counts > self.many_above] = 0
        ids[counts < self.few_below] = 2
        return ids

    def describe(self) -> dict[str, str]:
        """The boundaries in words, e.g. {"many": "> 100 training images", "medium": "20..100",
        "few": "< 20"}."""
        medium = (
            f"{self.few_below}..{self.many_above}" if self.few_below <= self.many_above else "none"
        )
        return {
            "many": f"> {self.many_above} training images",
            "medium": medium,
            "few": f"< {self.few_below}",
        }


def long_tail_accuracy(
    predictions: Tensor,
    labels: Tensor,
    train_counts: Tensor,
    buckets: ShotBuckets = ShotBuckets(),  # frozen, so a shared default is safe
) -> dict:
    """Accuracy per shot bucket from predicted and true class indices [N] (int64) and each
    class's number of training images train_counts [C] (integer).

    A bucket's accuracy is sample-level, as in the long-tail papers: correct test samples whose
    true class is in the bucket over all test samples of that bucket (not a mean of per-class
    accuracies). NaN where a bucket has no test sample. Returns {"many", "medium", "few", "all":
    float, "n": test samples per bucket, "classes": classes per bucket, "boundaries":
    buckets.describe()}.
    """
    if not isinstance(buckets, ShotBuckets):
        raise TypeError(f"buckets must be a ShotBuckets, got {type(buckets).__name__}")
    counts = _check_int(train_counts, "train_counts")
    if counts.numel() == 0:
        raise ValueError("train_counts must hold >= 1 class, got 0")
    if int(counts.min()) < 0:
        raise ValueError(f"train_counts must be >= 0, got min {int(counts.min())}")
    predictions, labels = _check_predictions(predictions, labels, counts.shape[0])
    class_bucket = buckets._bucket_ids(counts.to(labels.device))
    sample_bucket = class_bucket[labels]
    correct = predictions == labels
    out: dict = {}
    n: dict[str, int] = {}
    classes: dict[str, int] = {}
    for i, name in enumerate(BUCKETS):
        sel = sample_bucket == i
        n[name] = int(sel.sum())
        classes[name] = int((class_bucket == i).sum())
        out[name] = correct[sel].double().mean().item() if n[name] else math.nan
    out["all"] = correct.double().mean().item()
    n["all"] = int(labels.shape[0])
    classes["all"] = int(counts.shape[0])
    out["n"] = n
    out["classes"] = classes
    out["boundaries"] = buckets.describe()
    return out


# ---------------------------------------------------------------- retrieval


def _positive_pairs(positives: object, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(query, gallery) index pairs [K] int64, sorted by query; every query has >= 1."""
    if isinstance(positives, Tensor):
        pos = _check_int(positives, "positives", (1, 2))
        if pos.shape[0] != n:
            raise ValueError(
                f"positives must have one entry per query ({n}), got shape {tuple(pos.shape)}"
            )
        if pos.dim() == 2 and pos.shape[1] == 0:
            raise ValueError(f"positives must list >= 1 per query, got shape {tuple(pos.shape)}")
        _check_range(pos, "positives", m, "gallery indices")
        pos = pos.cpu().reshape(n, -1)
        return torch.arange(n).repeat_interleave(pos.shape[1]), pos.reshape(-1)
    if isinstance(positives, (str, bytes)) or not isinstance(positives, Sequence):
        raise TypeError(
            "positives must be an int64 Tensor [N] or a list of N sets/lists of gallery indices, "
            f"got {type(positives).__name__}"
        )
    if len(positives) != n:
        raise ValueError(
            f"positives must have one entry per query ({n}), got {len(positives)} entries"
        )
    qs: list[int] = []
    gs: list[int] = []
    for i, p in enumerate(positives):
        if isinstance(p, Tensor):
            p = p.reshape(-1).tolist()
        elif isinstance(p, Integral):
            p = [p]
        elif not isinstance(p, Iterable):
            raise TypeError(f"positives[{i}] must be a set/list of ints, got {type(p).__name__}")
        p = list(p)
        if not p:
            raise ValueError(f"positives[{i}] is empty: every query needs >= 1 positive")
        for g in p:
            if not isinstance(g, Integral) or isinstance(g, bool):
                raise TypeError(f"positives[{i}] must hold ints, got {type(g).__name__}")
            if not 0 <= g < m:
                raise ValueError(f"positives[{i}] holds {g}, outside the gallery [0, {m})")
        qs.extend([i] * len(p))
        gs.extend(int(g) for g in p)
    return torch.tensor(qs, dtype=torch.long), torch.tensor(gs, dtype=torch.long)


def _best_positive_rank(
    queries: Tensor, gallery: Tensor, pair_q: Tensor, pair_g: Tensor, chunk_size: int
) -> Tensor:
    """0-based rank [N] int64 of each query's best-ranked positive (stable tie-break by index),
    from L2-normalised queries [N, d] and gallery [M, d]; chunk_size queries at a time."""
    n, m = queries.shape[0], gallery.shape[0]
    device = queries.device
    pair_q, pair_g = pair_q.to(device), pair_g.to(device)
    cols = torch.arange(m, device=device)
    ranks = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = queries[start:stop] @ gallery.T  # [B, M]: the only N x M-sized buffer, per chunk
        lo, hi = torch.searchsorted(pair_q, torch.tensor([start, stop], device=device)).tolist()
        mask = torch.zeros_like(sims, dtype=torch.bool)
        mask[pair_q[lo:hi] - start, pair_g[lo:hi]] = True
        # The best positive is the one with the highest score, lowest index among equal scores;
        # everything ranked above it is then a negative.
        best = sims.masked_fill(~mask, -math.inf).amax(1, keepdim=True)
        best_col = torch.where(mask & (sims == best), cols, m).amin(1, keepdim=True)
        above = (sims > best).sum(1) + ((sims == best) & (cols < best_col)).sum(1)
        ranks.append(above)
    return torch.cat(ranks).cpu()


def _check_pair(query_emb: object, gallery_emb: object, qname: str, gname: str) -> None:
    query_emb = _check_float(query_emb, qname, (2,))
    gallery_emb = _check_float(gallery_emb, gname, (2,))
    if query_emb.shape[0] == 0 or gallery_emb.shape[0] == 0:
        raise ValueError(
            f"{qname} and {gname} must hold >= 1 row, got shapes {tuple(query_emb.shape)} "
            f"and {tuple(gallery_emb.shape)}"
        )
    if gallery_emb.shape[1] != query_emb.shape[1]:
        raise ValueError(
            f"{gname} must have the embedding size of {qname} ({query_emb.shape[1]}), "
            f"got shape {tuple(gallery_emb.shape)}"
        )


def _recall(
    query_emb: Tensor,
    gallery_emb: Tensor,
    pair_q: Tensor,
    pair_g: Tensor,
    ks: tuple[int, ...],
    chunk_size: int,
) -> dict[str, float]:
    dtype = _compute_dtype(query_emb, gallery_emb)
    queries = F.normalize(query_emb.to(dtype), dim=1)
    gallery = F.normalize(gallery_emb.to(dtype), dim=1).to(queries.device)
    rank = _best_positive_rank(queries, gallery, pair_q, pair_g, chunk_size)
    m = gallery.shape[0]
    return {f"R@{k}": (rank < min(k, m)).double().mean().item() for k in ks}


def _check_chunk_size(chunk_size: object) -> int:
    if not isinstance(chunk_size, Integral) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return int(chunk_size)


def retrieval_recall(
    query_emb: Tensor,
    gallery_emb: Tensor,
    positives: Positives,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Recall@k of cosine-similarity search of queries [N, d] in a gallery [M, d] (floating):
    the fraction of queries with at least one positive among their k most similar gallery items.
    Returns {"R@1": ..., "R@5": ..., "R@10": ...}.

    positives is an int64 Tensor [N] (one positive gallery index per query), an int64 Tensor
    [N, P] (P positives per query) or a list of N sets/lists of gallery indices (e.g. the 5
    captions of a COCO image). A k larger than M is clipped to M. Ties rank the lower gallery
    index first. Similarities are computed for chunk_size queries at a time, so N x M is never
    materialised at once.
    """
    _check_pair(query_emb, gallery_emb, "query_emb", "gallery_emb")
    chunk_size = _check_chunk_size(chunk_size)
    ks = _check_ks(ks, "ks")
    pair_q, pair_g = _positive_pairs(positives, query_emb.shape[0], gallery_emb.shape[0])
    return _recall(query_emb, gallery_emb, pair_q, pair_g, ks, chunk_size)


def image_text_retrieval(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, dict[str, float]]:
    """Recall@k in both directions between images [N, d] and captions [M, d] (floating), where
    text_to_image [M] (int64) is the image index of each caption. Image-to-text: an image's
    positives are all its captions; text-to-image: a caption's positive is its image. Returns
    {"image_to_text": {"R@1": ...}, "text_to_image": {"R@1": ...}}; see retrieval_recall."""
    _check_pair(image_emb, text_emb, "image_emb", "text_emb")
    chunk_size = _check_chunk_size(chunk_size)
    ks = _check_ks(ks, "ks")
    t2i = _check_int(text_to_image, "text_to_image")
    _check_same_length(text_emb, t2i, "text_emb", "text_to_image")
    n, m = image_emb.shape[0], text_emb.shape[0]
    _check_range(t2i, "text_to_image", n, "image indices")
    t2i = t2i.cpu()
    missing = torch.bincount(t2i, minlength=n) == 0
    if bool(missing.any()):
        first = int(missing.nonzero()[0])
        raise ValueError(
            f"text_to_image must give every image >= 1 caption; {int(missing.sum())} image(s) "
            f"have none (first: image {first})"
        )
    # Image i's positives are the captions mapped to it; pairs must be sorted by query (image).
    order = torch.sort(t2i, stable=True).indices
    return {
        "image_to_text": _recall(image_emb, text_emb, t2i[order], order, ks, chunk_size),
        "text_to_image": _recall(text_emb, image_emb, torch.arange(m), t2i, ks, chunk_size),
    }
