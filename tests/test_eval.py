"""reco.eval: metrics against brute-force loops / numpy and hand-built cases; result tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reco.eval import (
    ShotBuckets,
    accuracy,
    compare_methods,
    format_table,
    image_text_retrieval,
    long_tail_accuracy,
    mean_per_class_accuracy,
    per_class_accuracy,
    retrieval_recall,
    to_markdown,
    zero_shot_logits,
)
from reco.eval.report import is_percent_column


def _randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _randint(high: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(high, (n,), generator=torch.Generator().manual_seed(seed))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _stable_order(scores: np.ndarray) -> list[int]:
    """Indices by descending score, lower index first among equal scores."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


# ---------------------------------------------------------------- zero-shot logits


def test_zero_shot_logits_are_numpy_cosines():
    img, txt = _randn(30, 16, seed=0) * 3, _randn(7, 16, seed=1) * 0.5
    out = zero_shot_logits(img, txt)
    assert out.shape == (30, 7) and out.dtype == torch.float32
    want = _unit(img.double().numpy()) @ _unit(txt.double().numpy()).T
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-6)


def test_prompt_ensemble_equals_manual_average():
    img = _randn(12, 8, seed=2, dtype=torch.float64)
    # Prompt embeddings of very different norms: normalising before the mean must matter.
    txt = _randn(5, 3, 8, seed=3, dtype=torch.float64)
    txt = txt * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)[None, :, None]
    out = zero_shot_logits(img, txt)
    cls = np.stack([_unit(_unit(txt[c].numpy()).mean(0)) for c in range(5)])
    want = _unit(img.numpy()) @ cls.T
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-12)
    naive = _unit(img.numpy()) @ _unit(txt.numpy().mean(1)).T
    assert np.abs(out.numpy() - naive).max() > 1e-2
    # One prompt per class is the plain 2-D case.
    np.testing.assert_allclose(zero_shot_logits(img, txt[:, :1]), zero_shot_logits(img, txt[:, 0]))


def test_zero_shot_logits_half_inputs_compute_in_float32():
    img, txt = _randn(4, 8, seed=4).half(), _randn(3, 8, seed=5).half()
    out = zero_shot_logits(img, txt)
    assert out.dtype == torch.float32
    want = _unit(img.double().numpy()) @ _unit(txt.double().numpy()).T
    np.testing.assert_allclose(out.numpy(), want, atol=1e-6)


def test_zero_shot_logits_bad_input():
    img, txt = _randn(4, 8, seed=6), _randn(3, 8, seed=7)
    with pytest.raises(ValueError, match=r"class_text_emb must have the embedding size .*\(8\)"):
        zero_shot_logits(img, _randn(3, 9, seed=7))
    with pytest.raises(ValueError, match=r"image_emb must be 2-D, got shape \(8,\)"):
        zero_shot_logits(img[0], txt)
    with pytest.raises(ValueError, match=r"class_text_emb must be 2-D or 3-D"):
        zero_shot_logits(img, txt[None, None])
    with pytest.raises(TypeError, match=r"image_emb must have a floating dtype, got torch\.int64"):
        zero_shot_logits(img.long(), txt)
    with pytest.raises(TypeError, match=r"class_text_emb must be a torch\.Tensor, got ndarray"):
        zero_shot_logits(img, txt.numpy())
    with pytest.raises(ValueError, match="image_emb contains NaN"):
        zero_shot_logits(torch.full((2, 8), math.nan), txt)
    with pytest.raises(ValueError, match=">= 1 class and >= 1 prompt"):
        zero_shot_logits(img, torch.ones(3, 0, 8))


# ---------------------------------------------------------------- accuracy


def test_accuracy_hand_built():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.05, 0.0],  # label 0: rank 0
            [0.1, 0.6, 0.3, 0.0],  # label 2: rank 1
            [0.4, 0.3, 0.2, 0.1],  # label 3: rank 3
            [0.0, 0.0, 1.0, 2.0],  # label 1: rank 2 (tie with class 0, lower index first: 0, 1)
        ]
    )
    labels = torch.tensor([0, 2, 3, 1])
    assert accuracy(logits, labels, topk=(1, 2, 3, 4)) == {
        "top1": 0.25,
        "top2": 0.5,
        "top3": 0.5,
        "top4": 1.0,
    }


def test_accuracy_matches_loop_on_random_logits():
    n, c = 300, 12
    logits, labels = _randn(n, c, seed=10), _randint(c, n, seed=11)
    got = accuracy(logits, labels, topk=(1, 3, 5))
    for k in (1, 3, 5):
        hits = [int(labels[i]) in _stable_order(logits[i].numpy())[:k] for i in range(n)]
        assert got[f"top{k}"] == pytest.approx(sum(hits) / n, abs=1e-12)
    assert 0 < got["top1"] < got["top3"] < got["top5"] < 1


def test_accuracy_ties_follow_stable_sort():
    # Integer-valued logits: many ties. The rule is a stable descending sort (lower index first).
    n, c = 200, 6
    logits = torch.randint(0, 3, (n, c), generator=torch.Generator().manual_seed(12)).float()
    labels = _randint(c, n, seed=13)
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    for k in (1, 2, 4):
        want = (order[:, :k] == labels[:, None]).any(1).double().mean().item()
        assert accuracy(logits, labels, topk=(k,))[f"top{k}"] == pytest.approx(want, abs=1e-12)
    # All logits equal: the true class's rank is its index.
    flat, lab = torch.zeros(3, 4), torch.tensor([0, 1, 3])
    assert accuracy(flat, lab, topk=(1, 2, 3)) == pytest.approx(
        {"top1": 1 / 3, "top2": 2 / 3, "top3": 2 / 3}
    )


def test_accuracy_topk_larger_than_classes_is_clipped():
    logits, labels = _randn(20, 3, seed=14), _randint(3, 20, seed=15)
    got = accuracy(logits, labels)  # default (1, 5) with C = 3
    assert set(got) == {"top1", "top5"} and got["top5"] == 1.0
    assert got["top1"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())


def test_accuracy_bad_input():
    logits, labels = _randn(5, 4, seed=16), torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(TypeError, match=r"labels must have an integer dtype.*torch\.float32"):
        accuracy(logits, labels.float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*\[0, 4\]"):
        accuracy(logits, torch.tensor([0, 1, 2, 4, 0]))
    with pytest.raises(
        ValueError, match="logits and labels must have the same length, got 5 and 4"
    ):
        accuracy(logits, labels[:4])
    with pytest.raises(ValueError, match=r"topk must be a non-empty sequence of ints >= 1"):
        accuracy(logits, labels, topk=(0, 1))
    with pytest.raises(ValueError, match=r"logits must be 2-D, got shape \(4,\)"):
        accuracy(logits[0], labels[:1])
    with pytest.raises(ValueError, match="logits contains NaN"):
        accuracy(torch.full((5, 4), math.nan), labels)
    with pytest.raises(ValueError, match=r"labels must be 1-D, got shape \(5, 1\)"):
        accuracy(logits, labels[:, None])


# ---------------------------------------------------------------- per-class accuracy


def test_per_class_accuracy_hand_built():
    # class 0: 3 samples, 2 right; class 1: 2 samples, 2 right; class 2: 1 sample, 0 right;
    # class 3: no sample.
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 1, 3])
    got = per_class_accuracy(preds, labels, num_classes=4)
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert got[:3].tolist() == [2 / 3, 1.0, 0.0] and math.isnan(got[3])
    assert mean_per_class_accuracy(preds, labels, 4) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_per_class_accuracy_matches_loop():
    n, c = 400, 9
    labels, preds = _randint(c, n, seed=20), _randint(c, n, seed=21)
    # Bias predictions towards the truth so accuracies differ between classes.
    keep = _randint(3, n, seed=22) == 0
    preds = torch.where(keep, labels, preds)
    got = per_class_accuracy(preds, labels, c)
    for k in range(c):
        rows = [i for i in range(n) if labels[i] == k]
        assert got[k].item() == pytest.approx(sum(int(preds[i] == k) for i in rows) / len(rows))
    assert mean_per_class_accuracy(preds, labels, c) == pytest.approx(float(np.mean(got.numpy())))


def test_per_class_accuracy_bad_input():
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"predictions must be class indices \[N\].*argmax"):
        per_class_accuracy(_randn(3, 3, seed=23), labels, 3)
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 3\)"):
        per_class_accuracy(torch.tensor([0, 1, 3]), labels, 3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        per_class_accuracy(labels, labels, 0)
    with pytest.raises(ValueError, match=">= 1 sample, got 0"):
        mean_per_class_accuracy(labels[:0], labels[:0], 3)
    with pytest.raises(TypeError, match=r"predictions must have an integer dtype.*torch\.bool"):
        per_class_accuracy(labels == 1, labels, 3)


# ---------------------------------------------------------------- long-tail buckets


def test_shot_buckets_boundaries():
    b = ShotBuckets()
    counts = torch.tensor([101, 100, 20, 19, 0, 5000])
    assert b.bucket_of(counts) == ["many", "medium", "medium", "few", "few", "many"]
    assert b.describe() == {"many": "> 100 training images", "medium": "20..100", "few": "< 20"}
    custom = ShotBuckets(many_above=10, few_below=3)
    assert custom.bucket_of(torch.tensor([11, 10, 3, 2])) == ["many", "medium", "medium", "few"]
    assert ShotBuckets(5, 6).describe()["medium"] == "none"
    with pytest.raises(ValueError, match="few_below must be <= many_above \\+ 1"):
        ShotBuckets(many_above=10, few_below=20)
    with pytest.raises(ValueError, match="many_above must be an int >= 0"):
        ShotBuckets(many_above=-1)
    with pytest.raises(TypeError, match="train_counts must have an integer dtype"):
        b.bucket_of(torch.tensor([1.5]))


def test_long_tail_accuracy_hand_built():
    counts = torch.tensor([150, 50, 5])  # one class per bucket
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 1, 0])  # 3/4, 1/2, 0/4 right
    got = long_tail_accuracy(preds, labels, counts)
    assert got["many"] == 0.75 and got["medium"] == 0.5 and got["few"] == 0.0
    assert got["all"] == pytest.approx(0.4)
    assert got["n"] == {"many": 4, "medium": 2, "few": 4, "all": 10}
    assert got["classes"] == {"many": 1, "medium": 1, "few": 1, "all": 3}
    assert got["boundaries"] == ShotBuckets().describe()


def test_long_tail_accuracy_is_sample_level_within_bucket():
    # Two few-shot classes: class 0 has 1 sample (right), class 1 has 3 (all wrong). Sample-level
    # accuracy is 1/4; the mean of per-class accuracies would be 1/2.
    counts = torch.tensor([3, 4, 500])
    labels, preds = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 2, 2, 0])
    got = long_tail_accuracy(preds, labels, counts)
    assert got["few"] == 0.25
    # No test sample of the many-shot class and no medium class at all: NaN, counted as 0.
    assert math.isnan(got["many"]) and math.isnan(got["medium"])
    assert got["n"] == {"many": 0, "medium": 0, "few": 4, "all": 4}
    assert got["classes"] == {"many": 1, "medium": 0, "few": 2, "all": 3}


def test_long_tail_accuracy_matches_loop():
    c, n = 40, 1000
    g = np.random.default_rng(30)
    counts = torch.from_numpy(g.integers(1, 400, size=c))
    labels = torch.from_numpy(g.integers(0, c, size=n))
    preds = torch.where(torch.from_numpy(g.random(n) < 0.6), labels, _randint(c, n, seed=31))
    buckets = ShotBuckets(many_above=200, few_below=50)
    got = long_tail_accuracy(preds, labels, counts, buckets)
    name = {}
    for k in range(c):
        cnt = int(counts[k])
        name[k] = "many" if cnt > 200 else ("few" if cnt < 50 else "medium")
    for bucket in ("many", "medium", "few"):
        rows = [i for i in range(n) if name[int(labels[i])] == bucket]
        assert got["n"][bucket] == len(rows) > 0
        right = sum(int(preds[i] == labels[i]) for i in rows)
        assert got[bucket] == pytest.approx(right / len(rows))
        assert got["classes"][bucket] == sum(v == bucket for v in name.values())
    assert got["all"] == pytest.approx((preds == labels).double().mean().item())
    assert got["boundaries"]["many"] == "> 200 training images"


def test_long_tail_accuracy_bad_input():
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        long_tail_accuracy(torch.tensor([0, 1, 1]), labels, torch.tensor([5, 500]))
    with pytest.raises(ValueError, match="train_counts must be >= 0, got min -1"):
        long_tail_accuracy(labels, labels, torch.tensor([5, -1, 3]))
    with pytest.raises(TypeError, match="train_counts must have an integer dtype"):
        long_tail_accuracy(labels, labels, torch.tensor([5.0, 1.0, 3.0]))
    with pytest.raises(TypeError, match="buckets must be a ShotBuckets, got dict"):
        long_tail_accuracy(labels, labels, torch.tensor([5, 1, 3]), {"many_above": 3})


# ---------------------------------------------------------------- retrieval


def _brute_recall(q: torch.Tensor, g: torch.Tensor, positives, ks) -> dict[str, float]:
    """Sort the whole gallery for every query in float64 numpy."""
    sims = _unit(q.double().numpy()) @ _unit(g.double().numpy()).T
    hits = {k: 0 for k in ks}
    for i in range(len(sims)):
        order = _stable_order(sims[i])
        pos = {int(positives[i])} if isinstance(positives, torch.Tensor) else set(positives[i])
        for k in ks:
            hits[k] += bool(pos & set(order[:k]))
    return {f"R@{k}": hits[k] / len(sims) for k in ks}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retrieval_recall_single_positive_matches_brute_force(dtype):
    n, m, d = 60, 90, 8
    q, g = _randn(n, d, seed=40, dtype=dtype), _randn(m, d, seed=41, dtype=dtype)
    pos = _randint(m, n, seed=42)
    # Make part of the queries noisy copies of their positive, so recalls are not near zero.
    q[: n // 2] = g[pos[: n // 2]] + 0.5 * q[: n // 2]
    ks = (1, 5, 10, 50)
    got = retrieval_recall(q, g, pos, ks=ks)
    want = _brute_recall(q, g, pos, ks)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.3 < got["R@1"] < got["R@50"] < 1


def test_retrieval_recall_multiple_positives_and_chunks():
    n, m, d = 50, 120, 8
    q, g = _randn(n, d, seed=43), _randn(m, d, seed=44)
    rng = np.random.default_rng(45)
    sizes = rng.integers(1, 6, size=n)  # 1 to 5 positives per query
    positives = [set(rng.choice(m, size=s, replace=False).tolist()) for s in sizes]
    ks = (1, 5, 10)
    want = _brute_recall(q, g, positives, ks)
    got = retrieval_recall(q, g, positives, ks=ks)
    assert got == pytest.approx(want, abs=1e-12)
    assert got["R@10"] > 0
    # Chunking (even one query at a time, or chunks not dividing N) changes nothing.
    for chunk in (1, 7, 50, 4096):
        assert retrieval_recall(q, g, [sorted(p) for p in positives], ks, chunk_size=chunk) == got


def test_retrieval_recall_positive_tensor_forms_agree():
    n, m = 30, 40
    q, g = _randn(n, 6, seed=46), _randn(m, 6, seed=47)
    pos2 = torch.stack([_randint(m, n, seed=48), _randint(m, n, seed=49)], 1)  # [N, 2]
    as_list = [set(r) for r in pos2.tolist()]
    assert retrieval_recall(q, g, pos2) == retrieval_recall(q, g, as_list)
    assert retrieval_recall(q, g, pos2[:, 0]) == retrieval_recall(q, g, list(pos2[:, :1]))


def test_retrieval_recall_hand_built():
    # Gallery: unit vectors at 0, 10, 20, ... 90 degrees; the query at 0 degrees ranks them in
    # that order. Gallery rows 4 and 5 are identical (a tie: row 4 ranks first).
    ang = np.deg2rad([0, 10, 20, 30, 40, 40, 90])
    g = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1))
    q = torch.tensor([[1.0, 0.0]] * 5, dtype=torch.float64)
    # Positive rank: 0, 2, 4 (row 4), 5 (row 5, after its tie), best of {6, 3} = 3.
    positives = [[0], [2], [4], [5], {6, 3}]
    got = retrieval_recall(q, g, positives, ks=(1, 3, 4, 5, 6, 100))
    assert got == pytest.approx(
        {"R@1": 0.2, "R@3": 0.4, "R@4": 0.6, "R@5": 0.8, "R@6": 1.0, "R@100": 1.0}
    )


def test_image_text_retrieval_coco_like():
    n_img, per = 20, 5
    img = _randn(n_img, 8, seed=50)
    t2i = torch.arange(n_img).repeat_interleave(per)
    t2i = t2i[torch.randperm(len(t2i), generator=torch.Generator().manual_seed(51))]
    txt = img[t2i] + 1.2 * _randn(len(t2i), 8, seed=52)  # captions near their image
    got = image_text_retrieval(img, txt, t2i, ks=(1, 5), chunk_size=6)
    captions = [[j for j in range(len(t2i)) if t2i[j] == i] for i in range(n_img)]
    assert all(len(c) == per for c in captions)
    assert got["image_to_text"] == pytest.approx(_brute_recall(img, txt, captions, (1, 5)))
    assert got["text_to_image"] == pytest.approx(_brute_recall(txt, img, t2i, (1, 5)))
    assert got["image_to_text"] == retrieval_recall(img, txt, captions, ks=(1, 5))
    assert 0 < got["text_to_image"]["R@1"] < 1 and 0 < got["image_to_text"]["R@1"] < 1


def test_retrieval_bad_input():
    q, g = _randn(3, 4, seed=53), _randn(5, 4, seed=54)
    with pytest.raises(ValueError, match=r"positives must lie in \[0, 5\)"):
        retrieval_recall(q, g, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="positives must have one entry per query \\(3\\)"):
        retrieval_recall(q, g, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="positives must have an integer dtype"):
        retrieval_recall(q, g, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"positives\[1\] is empty"):
        retrieval_recall(q, g, [[0], set(), [2]])
    with pytest.raises(ValueError, match=r"positives\[2\] holds 7, outside the gallery \[0, 5\)"):
        retrieval_recall(q, g, [[0], [1], [2, 7]])
    with pytest.raises(TypeError, match=r"positives\[0\] must hold ints, got float"):
        retrieval_recall(q, g, [[0.5], [1], [2]])
    with pytest.raises(TypeError, match="positives must be an int64 Tensor"):
        retrieval_recall(q, g, "012")
    with pytest.raises(ValueError, match=r"gallery_emb must have the embedding size .*\(4\)"):
        retrieval_recall(q, _randn(5, 3, seed=55), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        retrieval_recall(q, g, torch.tensor([0, 1, 2]), chunk_size=0)
    with pytest.raises(ValueError, match="ks must be a non-empty sequence"):
        retrieval_recall(q, g, torch.tensor([0, 1, 2]), ks=())
    with pytest.raises(ValueError, match=r"every image >= 1 caption; 1 image\(s\).*image 2"):
        image_text_retrieval(q, g, torch.tensor([0, 1, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"text_to_image must lie in \[0, 3\)"):
        image_text_retrieval(q, g, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="text_emb and text_to_image must have the same length"):
        image_text_retrieval(q, g, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- report


def test_percent_column_rule():
    for name in ("acc", "top1_acc", "Acc", "many", "medium", "few", "all", "top1", "top5", "R@5"):
        assert is_percent_column(name), name
    for name in ("method", "n", "loss", "accuracy_delta", "r@5"):
        assert not is_percent_column(name), name


def test_format_table_exact():
    rows = [
        {"method": "zero-shot", "many": 0.7234, "few": 0.1, "n": 12, "loss": 0.123456},
        {"method": "retrieval+attn", "many": [0.70, 0.72, 0.74], "few": math.nan, "n": 3},
    ]
    got = format_table(rows, ["method", "many", "few", "n", "loss"], title="ImageNet-LT")
    assert got == "\n".join(
        [
            "ImageNet-LT",
            "method                many   few   n    loss",
            "--------------  ----------  ----  --  ------",
            "zero-shot             72.3  10.0  12  0.1235",
            "retrieval+attn  72.0 ± 2.0     -   3       -",
        ]
    )


def test_to_markdown_exact():
    rows = [{"method": "a|b", "top1": torch.tensor(0.5), "R@1": np.float32(0.25)}, {"method": "c"}]
    assert to_markdown(rows, ["method", "top1", "R@1"]) == "\n".join(
        [
            "| method | top1 | R@1 |",
            "|:---|---:|---:|",
            "| a\\|b | 50.0 | 25.0 |",
            "| c | - | - |",
        ]
    )


def test_compare_methods_uses_long_tail_results_in_insertion_order():
    counts = torch.tensor([150, 50, 5])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    results = {
        "zero-shot": long_tail_accuracy(torch.tensor([0, 1, 1, 1, 0, 0]), labels, counts),
        "baseline": long_tail_accuracy(torch.tensor([0, 0, 1, 0, 2, 0]), labels, counts),
        "ours (3 seeds)": {"many": [1.0, 1.0, 1.0], "medium": [0.5, 1.0, 1.0], "few": 1.0},
    }
    got = compare_methods(results)
    lines = got.splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == ["zero-shot", "baseline", "ours"]
    assert lines[0].split() == ["method", "many", "medium", "few", "all"]
    assert lines[2].split()[1:] == ["50.0", "100.0", "0.0", "50.0"]
    assert lines[3].split()[1:] == ["100.0", "50.0", "50.0", "66.7"]
    assert lines[4].split()[3:] == ["100.0", "±", "0.0", "83.3", "±", "28.9", "100.0", "-"]
    md = compare_methods(results, columns=["few"], title="LT", markdown=True)
    assert md.splitlines()[:3] == ["**LT**", "", "| method | few |"]


def test_report_bad_input():
    with pytest.raises(TypeError, match="rows must be a list of dicts"):
        format_table([1, 2], ["a"])
    with pytest.raises(TypeError, match="columns must be a non-empty list of str"):
        format_table([{"a": 1}], "a")
    with pytest.raises(TypeError, match="column 'n' holds a dict"):
        format_table([{"n": {"many": 3}}], ["n"])
    with pytest.raises(TypeError, match="column 'x' holds a list that is not all numbers"):
        to_markdown([{"x": [0.1, "a"]}], ["x"])
    with pytest.raises(TypeError, match=r"results\['a'\] must be a dict of metrics, got float"):
        compare_methods({"a": 0.5})
